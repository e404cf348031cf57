// CUDA Swin V2 (shifted) window attention: the launch API the torch binding (window_attention_v2.cpp) calls. Scaled
// cosine attention with a continuous position bias, fused from the qkv Linear's output in original NHWC token order
// to the attention output in original order (semantics: vitkernels/reference/window_attention_v2.py; the CPU kernels
// of csrc/cpu/window_attention_v2_kernel.h compute the same thing).
//
// Files, split as V1's (window_attention.cuh), all runtime-only (no torch):
//   window_attention_v2.cuh           this header: the launchers' declarations (host code only)
//   window_attention_v2_prologue.cuh  V2's device helpers: row / tile normalisation and its backward, CosineScores
//   window_attention_v2_fwd.cuh       forward kernel + launch_window_attention_v2_fwd
//   window_attention_v2_bwd.cuh       dq (+ d tau) and dk / dv kernels + launch_window_attention_v2_bwd
//   window_attention_v2_{fwd,bwd}_kernels.cu  explicit instantiations for VK_WINDOW_ATTENTION_TYPES
//
// The kernels are V1's (window_attention_{fwd,bwd}.cuh): the same blocks, prologue, tiles, online softmax, row sums,
// fixed-order reductions and limits (N = wh * ww <= 256, head_dim <= 128: WindowAttentionShape,
// window_attention_blocks, window_attention_supported), with the scores formed by CosineScores instead of V1's
// DotProductScores:
//   q^_i = q_i / max(|q_i|, eps), k^_j likewise (eps = 1e-12, F.normalize; staged tiles are normalised in place),
//   S_ij = tau_h (q^_i . k^_j) + table[rel(i, j), h] + (-100 if the tokens' regions differ)
//   forward   online softmax over the key tiles; lse_i = m_i + log(l_i).
//   bwd dq    G_i = sum_j dS_ij k^_j; dq_i = tau (G_i - q^_i (q^_i . G_i)) / |q_i| (tau G_i / eps where |q_i| < eps);
//             d tau: each block's sum of q^_i . G_i over its real rows, in thread order; stores delta.
//   bwd dk dv dv_j = sum_i P_ij dO_i, Gk_j = sum_i dS_ij q^_i, dk_j from Gk_j as dq; d_bias and the padded keys'
//             (dk, dv) as V1. The table gradient is V1's launch_window_attention_bias_grad.
// Every sum has a fixed order: deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"  // Acc
#include "window_attention.cuh"

namespace vitkernels {
namespace cuda {

// Launchers (defined in window_attention_v2_fwd.cuh / window_attention_v2_bwd.cuh, instantiated for the element types
// of VK_WINDOW_ATTENTION_TYPES in window_attention_v2_{fwd,bwd}_kernels.cu). Each returns cudaErrorInvalidValue for
// a problem window_attention_supported refuses, else the launch's error.

// out (B, H, W, C) and lse (windows, nH, N) from qkv (B, H, W, 3C); pad_row (3C); table (table_rows, nH) and scale
// (nH: tau, the clamped and exponentiated logit scale) in the compute type (float, double for double).
template <typename T>
cudaError_t launch_window_attention_v2_fwd(const T* qkv, const T* pad_row, const typename Acc<T>::type* table,
                                           const typename Acc<T>::type* scale, T* out, typename Acc<T>::type* lse,
                                           const WindowAttentionShape& p, cudaStream_t stream);

// Backward: grad_qkv (B, H, W, 3C), every real token's row written. Scratch from the caller, in the compute type:
//   delta (windows, nH, N); d_scale (windows, nH, chunks) with chunks = window_attention_blocks(p).chunks; d_bias
//   (groups, nH, N, N), zero-filled; d_pad (window_attention_pad_partials, nH, 2, hd), with groups =
//   window_attention_groups(windows, windows_per_group). The caller sums d_scale over windows and chunks, d_bias and
//   d_pad over their first dimension (the table gradient: launch_window_attention_bias_grad).
template <typename T>
cudaError_t launch_window_attention_v2_bwd(const T* grad_out, const T* qkv, const T* pad_row,
                                           const typename Acc<T>::type* table, const typename Acc<T>::type* scale,
                                           const T* out, const typename Acc<T>::type* lse,
                                           typename Acc<T>::type* delta, T* grad_qkv,
                                           typename Acc<T>::type* d_scale, typename Acc<T>::type* d_bias,
                                           typename Acc<T>::type* d_pad, const WindowAttentionShape& p,
                                           int64_t windows_per_group, cudaStream_t stream);

#define VK_WINDOW_ATTENTION_V2_EXTERN(T)                                                                           \
  extern template cudaError_t launch_window_attention_v2_fwd<T>(const T*, const T*, const Acc<T>::type*,          \
                                                                const Acc<T>::type*, T*, Acc<T>::type*,           \
                                                                const WindowAttentionShape&, cudaStream_t);       \
  extern template cudaError_t launch_window_attention_v2_bwd<T>(                                                  \
      const T*, const T*, const T*, const Acc<T>::type*, const Acc<T>::type*, const T*, const Acc<T>::type*,      \
      Acc<T>::type*, T*, Acc<T>::type*, Acc<T>::type*, Acc<T>::type*, const WindowAttentionShape&, int64_t,       \
      cudaStream_t);
VK_WINDOW_ATTENTION_TYPES(VK_WINDOW_ATTENTION_V2_EXTERN)
#undef VK_WINDOW_ATTENTION_V2_EXTERN

}  // namespace cuda
}  // namespace vitkernels
