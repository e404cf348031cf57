// What the torch bindings of the CUDA window attention kernels, Swin V1 (window_attention.cpp), V2
// (window_attention_v2.cpp) and 3D (window_attention_3d.cpp), share around their launches: the kernels' limits, the
// backward's scratch and the host-side reductions of its partial sums into the bias-table and qkv-bias gradients.
// Torch code: bindings only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "vitkernels/window_attention_args.h"
#include "window_attention.cuh"

namespace vitkernels {

// The CUDA kernels' own limits (window_attention.cuh), after check_window_attention_args.
inline void check_window_attention_cuda_limits(const char* op, const WindowAttentionProblem& p, const at::Tensor& qkv,
                                               at::IntArrayRef window_size) {
  TORCH_CHECK(qkv.is_cuda(), op, ": qkv must be a CUDA tensor, got ", qkv.device());
  TORCH_CHECK(p.N <= cuda::kWindowAttentionMaxTokens, op, ": the CUDA kernel supports windows of at most ",
              cuda::kWindowAttentionMaxTokens, " tokens, got ", window_size[0], " x ", window_size[1], " = ", p.N);
  TORCH_CHECK(p.hd <= cuda::kWindowAttentionMaxHeadDim, op, ": the CUDA kernel supports head_dim <= ",
              cuda::kWindowAttentionMaxHeadDim, ", got ", p.hd);
  TORCH_CHECK(p.nH <= 65535, op, ": the CUDA kernel supports at most 65535 heads, got ", p.nH);
  TORCH_CHECK(p.windows() <= INT32_MAX, op, ": too many windows for one launch: ", p.windows());
}

// The scratch launch_window_attention{,_v2}_bwd take, in the compute type: delta (windows, nH, N), d_bias (groups,
// nH, N, N) zero-filled, d_pad (pad partials, nH, 2, hd); a few dk / dv blocks per multiprocessor. Undefined tensors
// where nothing is launched (no windows).
struct WindowAttentionBackwardScratch {
  int64_t windows_per_group = 1;
  at::Tensor delta, d_bias, d_pad;
};

// (Problem: WindowAttentionProblem or WindowAttention3DProblem, with its kernel shape.)
template <typename Problem, typename Geometry>
inline WindowAttentionBackwardScratch window_attention_backward_scratch(
    const Problem& p, const cuda::WindowAttentionShapeT<Geometry>& shape, const at::Tensor& qkv) {
  const auto acc = qkv.options().dtype(window_attention_acc_type(qkv));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  WindowAttentionBackwardScratch s;
  s.windows_per_group = cuda::window_attention_windows_per_group(p.windows(), p.nH, 4 * sms);
  const int64_t groups = cuda::window_attention_groups(p.windows(), s.windows_per_group);
  // locals: nvcc's front end garbled {p.x} in a template (when the bindings were .cu files)
  const int64_t windows = p.windows(), nH = p.nH, N = p.N, hd = p.hd;
  s.delta = at::empty({windows, nH, N}, acc);
  s.d_bias = at::zeros({groups, nH, N, N}, acc);
  s.d_pad = at::empty({cuda::window_attention_pad_partials(shape, s.windows_per_group), nH, 2, hd}, acc);
  return s;
}

// After the backward's launch: grad_table in table's dtype (d_bias summed over groups in double, then scattered into
// the table by relative position: scatter(d_bias_sum (nH, N, N), grad_table) launches the geometry's bias-gradient
// kernel) and grad_bias in qkv_bias's dtype (empty without one): q gets nothing (padded queries have dO = 0), k and v
// the padded keys' gradients summed over the partials. Zeros without windows.
template <typename Problem, typename Scatter>
inline std::tuple<at::Tensor, at::Tensor> window_attention_table_and_bias_grads_with(
    const Problem& p, const WindowAttentionBackwardScratch& s, const at::Tensor& table, const at::Tensor& qkv,
    const std::optional<at::Tensor>& qkv_bias, Scatter&& scatter) {
  const int64_t nH = p.nH, hd = p.hd, C = p.C;  // (locals: see window_attention_backward_scratch)
  at::Tensor grad_table = at::zeros(table.sizes(), table.options().dtype(at::kDouble));
  at::Tensor d_pad_sum = at::zeros({nH, 2, hd}, qkv.options().dtype(at::kDouble));  // zero without padding
  if (s.d_bias.defined()) {
    // (nH, N, N); dims as IntArrayRef, not braced lists (see window_attention_v2.cpp)
    const at::Tensor d_bias_sum = at::sum(s.d_bias, at::IntArrayRef{0}, /*keepdim=*/false, at::kDouble).contiguous();
    C10_CUDA_CHECK(scatter(d_bias_sum.const_data_ptr<double>(), grad_table.mutable_data_ptr<double>()));
    d_pad_sum = at::sum(s.d_pad, at::IntArrayRef{0}, /*keepdim=*/false, at::kDouble);
  }
  at::Tensor grad_bias = at::empty({0}, qkv.options());
  if (qkv_bias.has_value()) {
    // Channel part * C + h * hd + d.
    const at::Tensor k_part = d_pad_sum.select(1, 0).reshape({C});
    const at::Tensor v_part = d_pad_sum.select(1, 1).reshape({C});
    grad_bias = at::cat({at::zeros({C}, k_part.options()), k_part, v_part}).to(qkv_bias->scalar_type());
  }
  return {grad_table.to(table.scalar_type()), grad_bias};
}

// The 2D ops' (V1, V2): the table gradient by launch_window_attention_bias_grad.
inline std::tuple<at::Tensor, at::Tensor> window_attention_table_and_bias_grads(
    const WindowAttentionProblem& p, const WindowAttentionBackwardScratch& s, const at::Tensor& table,
    const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias) {
  return window_attention_table_and_bias_grads_with(
      p, s, table, qkv, qkv_bias, [&](const double* d_bias, double* grad) {
        return cuda::launch_window_attention_bias_grad(d_bias, grad, p.g.wh, p.g.ww, p.nH,
                                                       at::cuda::getCurrentCUDAStream());
      });
}

}  // namespace vitkernels
