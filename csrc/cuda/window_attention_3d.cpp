// torch binding of the CUDA 3D window attention kernels (launch API: window_attention_3d.cuh; same op schemas,
// argument checks and outputs as csrc/cpu/window_attention_3d.cpp).
// Host code, compiled by the host compiler (no nvcc front end over torch's headers): the kernels are in
// window_attention_3d_{fwd,bwd}_kernels.cu.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "torch_cuda_types.h"
#include "vitkernels/window_attention_3d_args.h"
#include "window_attention_3d.cuh"
#include "window_attention_binding.h"

namespace vitkernels {
namespace {

using Problem = WindowAttention3DProblem;

// The checks both bindings share (vitkernels/window_attention_3d_args.h), then CUDA tensors and this kernel's limits
// (window_attention_3d.cuh), before any shape or index is formed from the arguments.
Problem check_problem(const char* op, const at::Tensor& qkv, const at::Tensor& table,
                      const std::optional<at::Tensor>& qkv_bias, at::IntArrayRef window_size,
                      at::IntArrayRef shift_size, int64_t num_heads, bool pad_before_shift) {
  const Problem p = check_window_attention_3d_args(op, qkv, table, qkv_bias, window_size, shift_size, num_heads,
                                                   pad_before_shift);
  TORCH_CHECK(qkv.is_cuda(), op, ": qkv must be a CUDA tensor, got ", qkv.device());
  TORCH_CHECK(p.N <= cuda::kWindowAttention3DMaxTokens, op, ": the CUDA kernel supports window_size with at most ",
              cuda::kWindowAttention3DMaxTokens, " tokens (wd * wh * ww), got ", window_size[0], " x ", window_size[1],
              " x ", window_size[2], " = ", p.N);
  TORCH_CHECK(p.hd <= cuda::kWindowAttentionMaxHeadDim, op, ": the CUDA kernel supports head_dim <= ",
              cuda::kWindowAttentionMaxHeadDim, ", got head_dim = qkv.size(4) / (3 * num_heads) = ", p.hd);
  TORCH_CHECK(p.nH <= 65535, op, ": the CUDA kernel supports num_heads <= 65535, got ", p.nH);
  TORCH_CHECK(p.windows() <= INT32_MAX, op, ": too many windows for one launch (qkv batch and volume): ",
              p.windows());
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_3d_cuda(const at::Tensor& qkv_in, const at::Tensor& table,
                                                            const std::optional<at::Tensor>& qkv_bias,
                                                            at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                            int64_t num_heads, double scale, bool pad_before_shift) {
  const Problem p = check_problem("window_attention_3d", qkv_in, table, qkv_bias, window_size, shift_size, num_heads,
                                  pad_before_shift);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  const auto acc = window_attention_acc_type(qkv);
  at::Tensor out = at::empty(p.out_shape(), qkv.options());
  at::Tensor lse = at::empty({p.windows(), p.nH, p.N}, qkv.options().dtype(acc));
  if (p.windows() == 0) return {out, lse};
  const at::Tensor tab = table.to(acc).contiguous();
  const auto shape = cuda::make_window_attention_3d_shape(p.g, p.nH, p.hd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "vitkernels_window_attention_3d_cuda",
                                  [&] {
    using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
    C10_CUDA_CHECK(cuda::launch_window_attention_3d_fwd(cptr<scalar_t>(qkv), cptr<scalar_t>(pad_row),
                                                        tab.const_data_ptr<acc_t>(), mptr<scalar_t>(out),
                                                        lse.mutable_data_ptr<acc_t>(), shape, scale,
                                                        at::cuda::getCurrentCUDAStream()));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_3d_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& table,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, int64_t num_heads, double scale, bool pad_before_shift) {
  const char* op = "window_attention_3d_backward";
  const Problem p =
      check_problem(op, qkv_in, table, qkv_bias, window_size, shift_size, num_heads, pad_before_shift);
  check_window_attention_3d_backward_args(op, p, qkv_in, grad_out_in, out_in, lse_in);
  const auto acc = window_attention_acc_type(qkv_in);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor out = out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  at::Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());  // every real token's row is written
  WindowAttentionBackwardScratch scratch;
  if (p.windows() > 0) {
    const at::Tensor tab = table.to(acc).contiguous();
    const auto shape = cuda::make_window_attention_3d_shape(p.g, p.nH, p.hd);
    scratch = window_attention_backward_scratch(p, shape, qkv);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(),
                                    "vitkernels_window_attention_3d_bwd_cuda", [&] {
      using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
      C10_CUDA_CHECK(cuda::launch_window_attention_3d_bwd(
          cptr<scalar_t>(grad_out), cptr<scalar_t>(qkv), cptr<scalar_t>(pad_row), tab.const_data_ptr<acc_t>(),
          cptr<scalar_t>(out), lse.const_data_ptr<acc_t>(), scratch.delta.mutable_data_ptr<acc_t>(),
          mptr<scalar_t>(grad_qkv), scratch.d_bias.mutable_data_ptr<acc_t>(), scratch.d_pad.mutable_data_ptr<acc_t>(),
          shape, scale, scratch.windows_per_group, at::cuda::getCurrentCUDAStream()));
    });
  }
  auto [grad_table, grad_bias] = window_attention_table_and_bias_grads_with(
      p, scratch, table, qkv, qkv_bias, [&](const double* d_bias, double* grad) {
        return cuda::launch_window_attention_3d_bias_grad(d_bias, grad, p.g.d.w, p.g.h.w, p.g.w.w, p.nH,
                                                          at::cuda::getCurrentCUDAStream());
      });
  return {grad_qkv, grad_table, grad_bias};
}

TORCH_LIBRARY_IMPL(vitkernels, CUDA, m) {
  m.impl("window_attention_3d", &window_attention_3d_cuda);
  m.impl("window_attention_3d_backward", &window_attention_3d_backward_cuda);
}

}  // namespace vitkernels
