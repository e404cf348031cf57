// torch binding of the CUDA masking kernels (launch API: masking.cuh; same op schemas as csrc/cpu/masking.cpp).
// Host code, compiled by the host compiler: the kernels are in masking_kernels.cu.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "masking.cuh"
#include "torch_cuda_types.h"
#include "vitkernels/masking_args.h"

namespace vitkernels {
namespace {

using masking_args::promoted;

// Ranks outside [0, L) become L, which every kernel treats as a masked position (no row of x is read or written):
// validating the values of a GPU tensor would synchronise with the host, so out-of-range ranks are masked instead
// (the CPU binding raises). One elementwise pass over the (N, L) ids.
at::Tensor masked_ranks(const at::Tensor& ids_restore) {
  const at::Tensor ids = ids_restore.to(at::kLong);
  const int64_t L = ids.size(1);
  return at::where(ids.ge(0).logical_and(ids.lt(L)), ids, L).contiguous();
}

}  // namespace

at::Tensor gather_rows_cuda(const at::Tensor& src, const at::Tensor& idx, const at::Tensor& inverse_idx,
                            const std::optional<at::Tensor>& add, std::optional<at::ScalarType> out_dtype) {
  // The kernel zero-fills rows whose id is outside [0, S): no id addresses memory.
  const auto dtype = masking_args::check_gather_rows(src, idx, inverse_idx, add, out_dtype);
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t N = src.size(0), S = src.size(1), D = src.size(2), K = idx.size(-1);
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
  masking_args::check_random_masking(x, noise, len_keep, pos_embed);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), L = x.size(1);
  const at::Tensor shuffle =
      std::get<1>(at::sort(noise, /*stable=*/true, /*dim=*/1, /*descending=*/false)).contiguous();
  at::Tensor restore = at::empty({N, L}, noise.options().dtype(at::kLong));
  const auto dtype = promoted(x, pos_embed);
  at::Tensor mask = at::empty({N, L}, x.options().dtype(dtype));
  if (N * L > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "vitkernels_masking_cuda", [&] {
      C10_CUDA_CHECK(cuda::launch_restore_and_mask(shuffle.const_data_ptr<int64_t>(),
                                                   restore.mutable_data_ptr<int64_t>(), mptr<scalar_t>(mask), N, L,
                                                   len_keep, at::cuda::getCurrentCUDAStream()));
    });
  }
  at::Tensor keep_ids = shuffle.narrow(1, 0, len_keep).contiguous();
  at::Tensor x_masked = gather_rows_cuda(x, keep_ids, restore, pos_embed, dtype);
  return {x_masked, mask, restore, keep_ids};
}

at::Tensor mae_unshuffle_cuda(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                              const std::optional<at::Tensor>& pos_embed) {
  const auto dtype = masking_args::check_mae_unshuffle(x, ids_restore, mask_token, pos_embed);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), keep = x.size(1) - 1, D = x.size(2), L = ids_restore.size(1);
  const at::Tensor xs = x.to(dtype).contiguous();
  const at::Tensor token = mask_token.to(dtype).reshape({D}).contiguous();
  const at::Tensor ids = masked_ranks(ids_restore);
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
  masking_args::check_mae_unshuffle_backward(grad, ids_restore, keep, x_dtype, token_dtype);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = grad.size(0), L = ids_restore.size(1), D = grad.size(2);
  const at::Tensor g = grad.contiguous();
  const at::Tensor ids = masked_ranks(ids_restore);
  // zeros, not empty: with ranks that are not a permutation (unchecked on the GPU) no row is left uninitialised
  at::Tensor grad_x = at::zeros({N, keep + 1, D}, grad.options());
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::zeros({N, D}, grad.options().dtype(acc_type));
  if (N * D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "vitkernels_unshuffle_bwd_cuda", [&] {
      using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
      C10_CUDA_CHECK(cuda::launch_unshuffle_bwd(cptr<scalar_t>(g), ids.const_data_ptr<int64_t>(),
                                                mptr<scalar_t>(grad_x), partial.mutable_data_ptr<acc_t>(), N, L, keep,
                                                D, at::cuda::getCurrentCUDAStream()));
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
