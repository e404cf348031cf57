// CUDA 3D (volumetric / video) shifted-window attention: the launch API the torch binding (window_attention_3d.cpp)
// calls. Fused from the qkv Linear's output in original (B, D, H, W) token order to the attention output in original
// order (semantics: vitkernels/reference/window_attention_3d.py, MONAI SwinUNETR / Video Swin; the CPU kernel of
// csrc/cpu/window_attention_3d.cpp computes the same thing).
//
// Files, split as the 2D op's (window_attention.cuh), all runtime-only (no torch):
//   window_attention_3d.cuh           this header: WindowLayout<WindowGeometry3D>, the 3D shape, the launchers'
//                                     declarations (host code only)
//   window_attention_3d_fwd.cuh       forward kernel + launch_window_attention_3d_fwd
//   window_attention_3d_bwd.cuh       dq, dk / dv and bias-table gradient kernels + their launchers
//   window_attention_3d_{fwd,bwd}_kernels.cu  explicit instantiations for VK_WINDOW_ATTENTION_TYPES
//
// The kernels are the 2D op's (window_attention_{fwd,bwd}.cuh): the same blocks, tiles, online softmax, row sums,
// fixed-order reductions and scores (DotProductScores), instantiated with the geometry WindowGeometry3D
// (csrc/include/vitkernels/window_geometry_3d.h: per-axis padding and shift in either order, windows depth-major, 27
// mask regions from padded coordinates, the 3D relative position index). What differs is the layout:
//   N = wd * wh * ww <= 512 tokens (MONAI's 7 x 7 x 7 = 343, Video Swin's 8 x 7 x 7 = 392, 8 x 8 x 8 = 512): rows of
//     more than 256 / G tokens are chunked over gridDim.z as in 2D;
//   the bias table has (2wd-1)(2wh-1)(2ww-1) < 8 N <= 4096 rows (13^3 = 2197 for 7 x 7 x 7): a block stages head h's
//     column in shared memory when it fits what the block's tiles and token arrays leave of the 48 KB (every table
//     of N <= 512 for head_dim <= 64 in fp32, <= 32 in fp64), else reads it in global memory (cached: the column is a
//     few KB);
//   the table gradient (launch_window_attention_3d_bias_grad) scatters d_bias by the 3D relative position.
// head_dim <= 128 as in 2D.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"  // Acc
#include "vitkernels/window_geometry_3d.h"
#include "window_attention.cuh"

namespace vitkernels {
namespace cuda {

constexpr int kWindowAttention3DMaxTokens = 512;       // N = wd * wh * ww
constexpr int kWindowAttention3DMaxTableRows = 4096;   // (2wd-1)(2wh-1)(2ww-1) < 8 wd wh ww <= 4096

template <> struct WindowLayout<WindowGeometry3D> {
  static constexpr int kMaxTokens = kWindowAttention3DMaxTokens;
  static constexpr int kMaxTableRows = kWindowAttention3DMaxTableRows;
  static constexpr bool kTableAlwaysShared = false;
};

using WindowAttentionShape3D = WindowAttentionShapeT<WindowGeometry3D>;

inline WindowAttentionShape3D make_window_attention_3d_shape(const WindowGeometry3D& g, int64_t num_heads,
                                                             int64_t head_dim) {
  WindowAttentionShape3D p;
  p.g = g;
  p.C = num_heads * head_dim;
  p.windows = g.B * g.windows_per_image();
  p.N = static_cast<int>(g.tokens_per_window());
  p.nH = static_cast<int>(num_heads);
  p.hd = static_cast<int>(head_dim);
  p.table_rows = static_cast<int>((2 * g.d.w - 1) * (2 * g.h.w - 1) * (2 * g.w.w - 1));
  p.rel_offset = static_cast<int>(g.relative_index(0, 0));
  return p;
}

// Launchers (defined in window_attention_3d_fwd.cuh / window_attention_3d_bwd.cuh, instantiated for the element types
// of VK_WINDOW_ATTENTION_TYPES in window_attention_3d_{fwd,bwd}_kernels.cu). Each returns cudaErrorInvalidValue for a
// problem window_attention_supported refuses, else the launch's error. Contracts as the 2D launchers'
// (window_attention.cuh), with (B, D, H, W, .) tensors:

// out (B, D, H, W, C) and lse (windows, nH, N) from qkv (B, D, H, W, 3C); pad_row (3C); table (table_rows, nH) in
// the compute type.
template <typename T>
cudaError_t launch_window_attention_3d_fwd(const T* qkv, const T* pad_row, const typename Acc<T>::type* table, T* out,
                                           typename Acc<T>::type* lse, const WindowAttentionShape3D& p, double scale,
                                           cudaStream_t stream);

// Backward: grad_qkv (B, D, H, W, 3C), every real token's row written; scratch delta (windows, nH, N), d_bias
// (groups, nH, N, N) zero-filled, d_pad (window_attention_pad_partials, nH, 2, hd), summed by the caller.
template <typename T>
cudaError_t launch_window_attention_3d_bwd(const T* grad_out, const T* qkv, const T* pad_row,
                                           const typename Acc<T>::type* table, const T* out,
                                           const typename Acc<T>::type* lse, typename Acc<T>::type* delta,
                                           T* grad_qkv, typename Acc<T>::type* d_bias, typename Acc<T>::type* d_pad,
                                           const WindowAttentionShape3D& p, double scale, int64_t windows_per_group,
                                           cudaStream_t stream);

// grad_table ((2wd-1)(2wh-1)(2ww-1), nH) from d_bias (nH, N, N) summed over windows, both D = double; every entry is
// written.
template <typename D>
cudaError_t launch_window_attention_3d_bias_grad(const D* d_bias, D* grad_table, int64_t wd, int64_t wh, int64_t ww,
                                                 int64_t num_heads, cudaStream_t stream);

#define VK_WINDOW_ATTENTION_3D_EXTERN(T)                                                                           \
  extern template cudaError_t launch_window_attention_3d_fwd<T>(const T*, const T*, const Acc<T>::type*, T*,      \
                                                                Acc<T>::type*, const WindowAttentionShape3D&,     \
                                                                double, cudaStream_t);                            \
  extern template cudaError_t launch_window_attention_3d_bwd<T>(                                                  \
      const T*, const T*, const T*, const Acc<T>::type*, const T*, const Acc<T>::type*, Acc<T>::type*, T*,        \
      Acc<T>::type*, Acc<T>::type*, const WindowAttentionShape3D&, double, int64_t, cudaStream_t);
VK_WINDOW_ATTENTION_TYPES(VK_WINDOW_ATTENTION_3D_EXTERN)
#undef VK_WINDOW_ATTENTION_3D_EXTERN
extern template cudaError_t launch_window_attention_3d_bias_grad<double>(const double*, double*, int64_t, int64_t,
                                                                         int64_t, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace vitkernels
