// Device helpers of the Swin V2 window attention kernels (window_attention_v2_fwd.cuh, window_attention_v2_bwd.cuh)
// on top of V1's (window_attention_prologue.cuh): F.normalize of a row held in registers and of the rows of a staged
// tile, its backward, and CosineScores, the scores policy (see DotProductScores) that turns V1's blocks into V2's.
// Notation: window_attention_v2.cuh.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"
#include "window_attention.cuh"
#include "window_attention_prologue.cuh"

namespace vitkernels {
namespace cuda {
namespace wa_detail {

template <typename A> __device__ __forceinline__ A normalize_eps() { return A(1e-12); }  // F.normalize

// x /= max(|x|, eps) in place for a row held as G slices (x: this thread's slice; F.normalize: a division); returns
// |x|, the same bits in all G threads.
template <int G, typename A>
__device__ __forceinline__ A normalize_row(A (&x)[kSlice]) {
  A ss = A(0);
#pragma unroll
  for (int d = 0; d < kSlice; ++d) ss += x[d] * x[d];
  const A norm = sqrt_acc(row_sum<G>(ss));
  const A den = max_acc(norm, normalize_eps<A>());
#pragma unroll
  for (int d = 0; d < kSlice; ++d) x[d] = x[d] / den;
  return norm;
}

// F.normalize's backward for one row times tau, in place over g (this thread's slice of dL/dx^ / tau): dx = tau (g -
// x^ (x^ . g)) / |x| where |x| >= eps, tau g / eps otherwise. Returns x^ . g (all G threads).
template <int G, typename A>
__device__ __forceinline__ A normalize_row_backward(const A (&x_hat)[kSlice], A norm, A tau, A (&g)[kSlice]) {
  A dot = A(0);
#pragma unroll
  for (int d = 0; d < kSlice; ++d) dot += x_hat[d] * g[d];
  dot = row_sum<G>(dot);
  const bool passes = norm >= normalize_eps<A>();
  const A inv = tau / max_acc(norm, normalize_eps<A>());
#pragma unroll
  for (int d = 0; d < kSlice; ++d) g[d] = (passes ? g[d] - x_hat[d] * dot : g[d]) * inv;
  return dot;
}

// The rows of a staged tile (TILE rows of G slices, row stride G * 33, as load_qkv_tile writes them) divided by
// max(|row|, eps); zero rows stay zero. Call after the barrier that completes the tile; ends with a barrier.
template <int G, int TILE, typename A>
__device__ __forceinline__ void normalize_tile_rows(A* tile) {
  constexpr int RS = G * kSliceStride;
  __shared__ A den_s[TILE];
  for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
    A ss = A(0);
    for (int s = 0; s < G; ++s)
      for (int d = 0; d < kSlice; ++d) {
        const A v = tile[r * RS + s * kSliceStride + d];
        ss += v * v;
      }
    den_s[r] = max_acc(sqrt_acc(ss), normalize_eps<A>());
  }
  __syncthreads();
  for (int e = threadIdx.x; e < TILE * G * kSlice; e += blockDim.x) {
    const int r = e / (G * kSlice), rem = e - r * (G * kSlice);
    tile[r * RS + (rem / kSlice) * kSliceStride + rem % kSlice] /= den_s[r];
  }
  __syncthreads();
}

// Sum of v over the block's threads in thread order (a fixed order: deterministic), returned to thread 0.
template <typename A>
__device__ __forceinline__ A block_sum_ordered(A v) {
  __shared__ A stage[kWindowAttentionMaxThreads];
  stage[threadIdx.x] = v;
  __syncthreads();
  A sum = A(0);
  if (threadIdx.x == 0)
    for (int t = 0; t < static_cast<int>(blockDim.x); ++t) sum += stage[t];
  return sum;
}

// Swin V2's scores for V1's blocks (the interface: DotProductScores): S_ij = tau_h (q^_i . k^_j) with q, k loaded as
// they are and normalised in registers / in the staged tiles; the gradients of q and k go back through the
// normalisation; query_grad's share is q^_i . G_i, the row's part of d tau.
template <typename A>
struct CosineScores {
  A tau;  // head h's scale
  __device__ __forceinline__ A query_mul() const { return A(1); }
  template <int G> __device__ __forceinline__ A normalize(A (&x)[kSlice]) const { return normalize_row<G>(x); }
  template <int G, int TILE> __device__ __forceinline__ void normalize_tile(A* tile) const {
    normalize_tile_rows<G, TILE>(tile);
  }
  __device__ __forceinline__ A logits(A dot) const { return dot * tau; }
  template <int G>
  __device__ __forceinline__ A query_grad(const A (&q_hat)[kSlice], A norm, A (&g)[kSlice]) const {
    return normalize_row_backward<G>(q_hat, norm, tau, g);
  }
  template <int G>
  __device__ __forceinline__ void key_grad(const A (&k_hat)[kSlice], A norm, A (&g)[kSlice]) const {
    normalize_row_backward<G>(k_hat, norm, tau, g);
  }
};

}  // namespace wa_detail
}  // namespace cuda
}  // namespace vitkernels
