// Backward kernels of the CUDA 3D window attention (dq; dk, dv and the per-group bias-gradient partials; the 3D
// bias-table gradient) and their launchers (declared in window_attention_3d.cuh, instantiated in
// window_attention_3d_bwd_kernels.cu): the 2D op's backward blocks (window_attention_bwd.cuh) over WindowGeometry3D.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "window_attention.cuh"
#include "window_attention_3d.cuh"
#include "window_attention_bwd.cuh"
#include "window_attention_prologue.cuh"

namespace vitkernels {
namespace cuda {
namespace wa_detail {

// Backward (a), dq: grid (windows, nH, chunks), thread = (query row i, slice): the q part of grad_qkv and delta.
template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_3d_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                      const T* __restrict__ pad_row, const typename Acc<T>::type* __restrict__ table,
                                      const T* __restrict__ out, const typename Acc<T>::type* __restrict__ lse,
                                      typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                      const WindowAttentionShape3D p, const typename Acc<T>::type scale) {
  window_attention_bwd_dq_block<T, G>(grad_out, qkv, pad_row, table, out, lse, delta, grad_qkv, p,
                                      DotProductScores<typename Acc<T>::type>{scale});
}

// Backward (b), dk, dv, d_bias: grid (groups, nH, chunks), thread = (key row j, slice); d_bias and d_pad partials
// as the 2D op's.
template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_3d_bwd_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                        const T* __restrict__ pad_row,
                                        const typename Acc<T>::type* __restrict__ table,
                                        const typename Acc<T>::type* __restrict__ lse,
                                        const typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                        typename Acc<T>::type* __restrict__ d_bias,
                                        typename Acc<T>::type* __restrict__ d_pad, const WindowAttentionShape3D p,
                                        const typename Acc<T>::type scale, const int64_t windows_per_group) {
  window_attention_bwd_dkdv_block<T, G>(grad_out, qkv, pad_row, table, lse, delta, grad_qkv, d_bias, d_pad, p,
                                        DotProductScores<typename Acc<T>::type>{scale}, windows_per_group);
}

// grad_table[r, h] = sum of d_bias[h, i, j] (already summed over windows) over the pairs with relative_index(i, j)
// = r: r is a per-axis offset (dz, dy, dx) = (z_i - z_j, y_i - y_j, x_i - x_j), so each query i has at most one
// such key. One thread per table entry, a fixed order: deterministic. (Used with D = double.)
template <typename D>
__global__ void window_attention_3d_bias_grad_kernel(const D* __restrict__ d_bias, D* __restrict__ grad_table,
                                                     int wd, int wh, int ww, int nH) {
  const int sh = 2 * wh - 1, sw = 2 * ww - 1;
  const int64_t total = static_cast<int64_t>(2 * wd - 1) * sh * sw * nH;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int N = wd * wh * ww;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int r = static_cast<int>(e / nH), h = static_cast<int>(e - static_cast<int64_t>(r) * nH);
    const int dz = r / (sh * sw) - (wd - 1);
    const int dy = (r / sw) % sh - (wh - 1);
    const int dx = r % sw - (ww - 1);
    D sum = D(0);
    for (int zi = 0; zi < wd; ++zi) {
      const int zj = zi - dz;
      if (zj < 0 || zj >= wd) continue;
      for (int yi = 0; yi < wh; ++yi) {
        const int yj = yi - dy;
        if (yj < 0 || yj >= wh) continue;
        for (int xi = 0; xi < ww; ++xi) {
          const int xj = xi - dx;
          if (xj < 0 || xj >= ww) continue;
          const int i = (zi * wh + yi) * ww + xi, j = (zj * wh + yj) * ww + xj;
          sum += d_bias[(static_cast<int64_t>(h) * N + i) * N + j];
        }
      }
    }
    grad_table[e] = sum;
  }
}

}  // namespace wa_detail

// Declared, with its contract, in window_attention_3d.cuh.
template <typename T>
cudaError_t launch_window_attention_3d_bwd(const T* grad_out, const T* qkv, const T* pad_row,
                                           const typename Acc<T>::type* table, const T* out,
                                           const typename Acc<T>::type* lse, typename Acc<T>::type* delta,
                                           T* grad_qkv, typename Acc<T>::type* d_bias, typename Acc<T>::type* d_pad,
                                           const WindowAttentionShape3D& p, double scale, int64_t windows_per_group,
                                           cudaStream_t stream) {
  using A = typename Acc<T>::type;
  return wa_detail::dispatch_backward(p, windows_per_group, [&](auto tag, const dim3& grid_dq, const dim3& grid_dkdv,
                                                                int threads) {
    constexpr int G = decltype(tag)::value;
    wa_detail::window_attention_3d_bwd_dq_kernel<T, G><<<grid_dq, threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, out, lse, delta, grad_qkv, p, static_cast<A>(scale));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    wa_detail::window_attention_3d_bwd_dkdv_kernel<T, G><<<grid_dkdv, threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, lse, delta, grad_qkv, d_bias, d_pad, p, static_cast<A>(scale),
        windows_per_group);
    return cudaGetLastError();
  });
}

template <typename D>
cudaError_t launch_window_attention_3d_bias_grad(const D* d_bias, D* grad_table, int64_t wd, int64_t wh, int64_t ww,
                                                 int64_t num_heads, cudaStream_t stream) {
  constexpr int kThreads = 256;
  if (wd < 1 || wh < 1 || ww < 1 || num_heads < 1 || wd * wh * ww > kWindowAttention3DMaxTokens ||
      num_heads > 65535) {
    return cudaErrorInvalidValue;  // the int math above assumes a window the forward accepts
  }
  const int64_t total = (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1) * num_heads;
  wa_detail::window_attention_3d_bias_grad_kernel<D><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
      d_bias, grad_table, static_cast<int>(wd), static_cast<int>(wh), static_cast<int>(ww),
      static_cast<int>(num_heads));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vitkernels
