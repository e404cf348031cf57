// torch binding of the CUDA Swin V2 window attention kernels (launch API: window_attention_v2.cuh; same op schemas,
// argument checks and outputs as csrc/cpu/window_attention_v2.cpp).
// Host code, compiled by the host compiler (no nvcc front end over torch's headers): the kernels are in
// window_attention_v2_{fwd,bwd}_kernels.cu.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "torch_cuda_types.h"
#include "vitkernels/window_attention_args.h"
#include "window_attention_binding.h"
#include "window_attention_v2.cuh"

namespace vitkernels {
namespace {

using Problem = WindowAttentionProblem;

// V1's shared checks (vitkernels/window_attention_args.h), the (nH,) scale, CUDA tensors and the kernels' limits.
Problem check_problem(const char* op, const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& scale,
                      const std::optional<at::Tensor>& qkv_bias, at::IntArrayRef window_size,
                      at::IntArrayRef shift_size, int64_t num_heads) {
  const Problem p = check_window_attention_args(op, qkv, table, qkv_bias, window_size, shift_size, num_heads);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == num_heads, op, ": scale must be (", num_heads, "), got ",
              scale.sizes());
  check_same_device(op, qkv, scale, "scale");
  check_window_attention_cuda_limits(op, p, qkv, window_size);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_v2_cuda(const at::Tensor& qkv_in, const at::Tensor& table,
                                                            const at::Tensor& scale,
                                                            const std::optional<at::Tensor>& qkv_bias,
                                                            at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                            int64_t num_heads, bool save_probs) {
  const Problem p =
      check_problem("window_attention_v2", qkv_in, table, scale, qkv_bias, window_size, shift_size, num_heads);
  // the CUDA kernels recompute P from the lse (the Python op asks for the saved softmax on CPU only)
  TORCH_CHECK(!save_probs, "window_attention_v2: save_probs is CPU-only; the CUDA kernels keep the row log-sum-exp");
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  const auto acc = window_attention_acc_type(qkv);
  at::Tensor out = at::empty(p.out_shape(), qkv.options());
  at::Tensor lse = at::empty({p.windows(), p.nH, p.N}, qkv.options().dtype(acc));
  if (p.windows() == 0) return {out, lse};
  const at::Tensor tab = table.to(acc).contiguous();
  const at::Tensor tau = scale.to(acc).contiguous();
  const auto shape = cuda::make_window_attention_shape(p.g, p.nH, p.hd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "vitkernels_window_attention_v2_cuda",
                                  [&] {
    using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
    C10_CUDA_CHECK(cuda::launch_window_attention_v2_fwd(cptr<scalar_t>(qkv), cptr<scalar_t>(pad_row),
                                                        tab.const_data_ptr<acc_t>(), tau.const_data_ptr<acc_t>(),
                                                        mptr<scalar_t>(out), lse.mutable_data_ptr<acc_t>(), shape,
                                                        at::cuda::getCurrentCUDAStream()));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_v2_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& table, const at::Tensor& scale,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, int64_t num_heads) {
  const char* op = "window_attention_v2_backward";
  const Problem p = check_problem(op, qkv_in, table, scale, qkv_bias, window_size, shift_size, num_heads);
  check_window_attention_backward_args(op, p, qkv_in, grad_out_in, out_in, lse_in);
  const auto acc = window_attention_acc_type(qkv_in);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor out = out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  at::Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());  // every real token's row is written
  at::Tensor grad_scale = at::zeros({p.nH}, scale.options().dtype(at::kDouble));
  WindowAttentionBackwardScratch scratch;
  if (p.windows() > 0) {
    const at::Tensor tab = table.to(acc).contiguous();
    const at::Tensor tau = scale.to(acc).contiguous();
    const auto shape = cuda::make_window_attention_shape(p.g, p.nH, p.hd);
    scratch = window_attention_backward_scratch(p, shape, qkv);
    // d tau: one partial sum per (window, head, chunk of query rows), summed here in double.
    at::Tensor d_scale = at::empty({p.windows(), p.nH, cuda::window_attention_blocks(shape).chunks},
                                   qkv.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(),
                                    "vitkernels_window_attention_v2_bwd_cuda", [&] {
      using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
      C10_CUDA_CHECK(cuda::launch_window_attention_v2_bwd(
          cptr<scalar_t>(grad_out), cptr<scalar_t>(qkv), cptr<scalar_t>(pad_row), tab.const_data_ptr<acc_t>(),
          tau.const_data_ptr<acc_t>(), cptr<scalar_t>(out), lse.const_data_ptr<acc_t>(),
          scratch.delta.mutable_data_ptr<acc_t>(), mptr<scalar_t>(grad_qkv), d_scale.mutable_data_ptr<acc_t>(),
          scratch.d_bias.mutable_data_ptr<acc_t>(), scratch.d_pad.mutable_data_ptr<acc_t>(), shape,
          scratch.windows_per_group, at::cuda::getCurrentCUDAStream()));
    });
    // dims as an IntArrayRef: a braced {0, 2} was ambiguous with the DimnameList overload for nvcc and torch 2.11
    grad_scale = at::sum(d_scale, at::IntArrayRef{0, 2}, /*keepdim=*/false, at::kDouble);
  }
  // The table gradient and the padded keys' (dk, dv) as V1.
  auto [grad_table, grad_bias] = window_attention_table_and_bias_grads(p, scratch, table, qkv, qkv_bias);
  return {grad_qkv, grad_table, grad_scale.to(scale.scalar_type()), grad_bias};
}

TORCH_LIBRARY_IMPL(vitkernels, CUDA, m) {
  m.impl("window_attention_v2", &window_attention_v2_cuda);
  m.impl("window_attention_v2_backward", &window_attention_v2_backward_cuda);
}

}  // namespace vitkernels
