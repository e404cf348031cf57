// torch binding of the CUDA masking kernels in masking.cuh (same op schemas as csrc/cpu/masking.cpp).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "masking.cuh"
#include "torch_cuda_types.h"

namespace vitkernels {
namespace {

at::ScalarType promoted(const at::Tensor& a, const std::optional<at::Tensor>& b) {
  return b.has_value() ? at::promote_types(a.scalar_type(), b->scalar_type()) : a.scalar_type();
}

}  // namespace

at::Tensor gather_rows_cuda(const at::Tensor& src, const at::Tensor& idx, const at::Tensor& inverse_idx,
                            const std::optional<at::Tensor>& add, std::optional<at::ScalarType> out_dtype) {
  (void)inverse_idx;  // used by the backward
  TORCH_CHECK(src.dim() == 3 && (idx.dim() == 1 || idx.dim() == 2),
              "gather_rows: src must be (N, S, D) and idx (K,) or (N, K)");
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t N = src.size(0), S = src.size(1), D = src.size(2), K = idx.size(-1);
  const auto dtype = out_dtype.value_or(promoted(src, add));
  const at::Tensor s = src.to(dtype).contiguous();
  const at::Tensor ix = idx.to(at::kLong).contiguous();
  std::optional<at::Tensor> a;
  if (add.has_value()) a = add->to(dtype).contiguous();
  at::Tensor out = at::empty({N, K, D}, src.options().dtype(dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "vitkernels_gather_rows_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_gather_rows(cptr<scalar_t>(s), ix.const_data_ptr<int64_t>(),
                                            a.has_value() ? cptr<scalar_t>(*a) : nullptr, mptr<scalar_t>(out), N, K, S,
                                            D, idx.dim() == 2 ? K : 0, a.has_value() && a->size(0) != 1 ? S * D : 0,
                                            at::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(
    const at::Tensor& x, const at::Tensor& noise, int64_t len_keep, const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(x.dim() == 3 && noise.dim() == 2 && noise.size(0) == x.size(0) && noise.size(1) == x.size(1),
              "random_masking: x must be (N, L, D) and noise (N, L)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), L = x.size(1);
  TORCH_CHECK(len_keep >= 0 && len_keep <= L, "random_masking: len_keep must be in [0, ", L, "]");
  const at::Tensor shuffle = std::get<1>(at::sort(noise, /*stable=*/true, /*dim=*/1, /*descending=*/false)).contiguous();
  at::Tensor restore = at::empty({N, L}, noise.options().dtype(at::kLong));
  const auto dtype = promoted(x, pos_embed);
  at::Tensor mask = at::empty({N, L}, x.options().dtype(dtype));
  if (N * L > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "vitkernels_masking_cuda", [&] {
      C10_CUDA_CHECK(cuda::launch_restore_and_mask(shuffle.const_data_ptr<int64_t>(), restore.mutable_data_ptr<int64_t>(),
                                                   mptr<scalar_t>(mask), N, L, len_keep,
                                                   at::cuda::getCurrentCUDAStream()));
    });
  }
  at::Tensor keep_ids = shuffle.narrow(1, 0, len_keep).contiguous();
  at::Tensor x_masked = gather_rows_cuda(x, keep_ids, restore, pos_embed, dtype);
  return {x_masked, mask, restore, keep_ids};
}

at::Tensor mae_unshuffle_cuda(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                              const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(x.dim() == 3 && ids_restore.dim() == 2 && ids_restore.size(0) == x.size(0),
              "mae_unshuffle: x must be (N, 1 + keep, D) and ids_restore (N, L)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), keep = x.size(1) - 1, D = x.size(2), L = ids_restore.size(1);
  auto dtype = at::promote_types(x.scalar_type(), mask_token.scalar_type());
  if (pos_embed.has_value()) dtype = at::promote_types(dtype, pos_embed->scalar_type());
  const at::Tensor xs = x.to(dtype).contiguous();
  const at::Tensor token = mask_token.to(dtype).reshape({D}).contiguous();
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  std::optional<at::Tensor> pos;
  if (pos_embed.has_value()) pos = pos_embed->to(dtype).contiguous();
  at::Tensor out = at::empty({N, L + 1, D}, x.options().dtype(dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "vitkernels_mae_unshuffle_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_unshuffle_fwd(cptr<scalar_t>(xs), ids.const_data_ptr<int64_t>(), cptr<scalar_t>(token),
                                              pos.has_value() ? cptr<scalar_t>(*pos) : nullptr, mptr<scalar_t>(out), N,
                                              L, keep, D, pos.has_value() && pos->size(0) != 1 ? (L + 1) * D : 0,
                                              at::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mae_unshuffle_backward_cuda(const at::Tensor& grad, const at::Tensor& ids_restore,
                                                               int64_t keep, at::ScalarType x_dtype,
                                                               at::ScalarType token_dtype) {
  TORCH_CHECK(grad.dim() == 3 && ids_restore.dim() == 2 && grad.size(1) == ids_restore.size(1) + 1,
              "mae_unshuffle_backward: grad must be (N, 1 + L, D) for ids_restore (N, L)");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = grad.size(0), L = ids_restore.size(1), D = grad.size(2);
  const at::Tensor g = grad.contiguous();
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  at::Tensor grad_x = at::empty({N, keep + 1, D}, grad.options());
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::zeros({N, D}, grad.options().dtype(acc_type));
  if (N * D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "vitkernels_unshuffle_bwd_cuda", [&] {
      using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
      C10_CUDA_CHECK(cuda::launch_unshuffle_bwd(cptr<scalar_t>(g), ids.const_data_ptr<int64_t>(), mptr<scalar_t>(grad_x),
                                                partial.mutable_data_ptr<acc_t>(), N, L, keep, D,
                                                at::cuda::getCurrentCUDAStream()));
    });
  }
  return {grad_x.to(x_dtype), partial.sum(0).to(token_dtype)};
}

TORCH_LIBRARY_IMPL(vitkernels, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("random_masking", &random_masking_cuda);
  m.impl("mae_unshuffle", &mae_unshuffle_cuda);
  m.impl("mae_unshuffle_backward", &mae_unshuffle_backward_cuda);
}

}  // namespace vitkernels
