// CUDA kernels for MAE / MSN token masking and the launchers declared in masking.cuh, instantiated for every
// element type the binding dispatches over (VK_MASKING_TYPES). Runtime-only (no torch headers): compiled by nvcc
// beside the binding (masking.cpp), which the host compiler compiles.
#include <cstdint>

#include "common.cuh"  // Acc, to_acc, from_acc, grid_for
#include "masking.cuh"

namespace vitkernels {
namespace cuda {

#define VK_GRID_STRIDE(i, total)                                                                     \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (total);        \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// out[n, k, d] = src[n, j, d] (+ add[n or 0, j, d]) with j = idx[n or shared, k]; 0 where j is outside [0, S).
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx,
                                   const T* __restrict__ add, T* __restrict__ out, int64_t N, int64_t K, int64_t S,
                                   int64_t D, int64_t idx_batch_stride, int64_t add_batch_stride) {
  VK_GRID_STRIDE(i, N * K * D) {
    const int64_t row = i / D, d = i - row * D;
    const int64_t n = row / K, k = row - n * K;
    const int64_t j = idx[n * idx_batch_stride + k];
    if (j < 0 || j >= S) {
      out[i] = from_acc<T>(0);
      continue;
    }
    auto v = to_acc(src[(n * S + j) * D + d]);
    if (add != nullptr) v += to_acc(add[n * add_batch_stride + j * D + d]);
    out[i] = from_acc<T>(v);
  }
}

// From the sorted order: ids_restore[n, shuffle[n, r]] = r, mask = 1 where r >= len_keep (removed).
template <typename T>
__global__ void restore_and_mask_kernel(const int64_t* __restrict__ shuffle, int64_t* __restrict__ restore,
                                        T* __restrict__ mask, int64_t N, int64_t L, int64_t len_keep) {
  VK_GRID_STRIDE(i, N * L) {
    const int64_t n = i / L, rank = i - n * L;
    const int64_t patch = shuffle[i];
    restore[n * L + patch] = rank;
    mask[n * L + patch] = from_acc<T>(rank >= len_keep ? 1 : 0);
  }
}

// Decoder input: out[n, 0] = x[n, 0]; out[n, 1 + l] = x[n, 1 + ids[n, l]] if ids[n, l] < keep else token; + pos.
template <typename T>
__global__ void unshuffle_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ ids,
                                     const T* __restrict__ token, const T* __restrict__ pos, T* __restrict__ out,
                                     int64_t N, int64_t L, int64_t keep, int64_t D, int64_t pos_batch_stride) {
  VK_GRID_STRIDE(i, N * (L + 1) * D) {
    const int64_t row = i / D, d = i - row * D;
    const int64_t n = row / (L + 1), t = row - n * (L + 1);
    typename Acc<T>::type v;
    if (t == 0) {
      v = to_acc(x[n * (keep + 1) * D + d]);
    } else {
      const int64_t rank = ids[n * L + t - 1];
      v = rank < keep ? to_acc(x[(n * (keep + 1) + 1 + rank) * D + d]) : to_acc(token[d]);
    }
    if (pos != nullptr) v += to_acc(pos[n * pos_batch_stride + t * D + d]);
    out[i] = from_acc<T>(v);
  }
}

// Backward, visible tokens: grad_x[n, 0] = grad[n, 0]; grad_x[n, 1 + rank] = grad[n, 1 + l] for rank < keep.
template <typename T>
__global__ void unshuffle_bwd_scatter_kernel(const T* __restrict__ grad, const int64_t* __restrict__ ids,
                                             T* __restrict__ grad_x, int64_t N, int64_t L, int64_t keep, int64_t D) {
  VK_GRID_STRIDE(i, N * (L + 1) * D) {
    const int64_t row = i / D, d = i - row * D;
    const int64_t n = row / (L + 1), t = row - n * (L + 1);
    if (t == 0) {
      grad_x[n * (keep + 1) * D + d] = grad[i];
    } else {
      const int64_t rank = ids[n * L + t - 1];
      if (rank < keep) grad_x[(n * (keep + 1) + 1 + rank) * D + d] = grad[i];
    }
  }
}

// Backward, mask token: partial[n, d] = sum over masked positions l of grad[n, 1 + l, d] (one thread per (n, d)).
template <typename T>
__global__ void unshuffle_bwd_token_kernel(const T* __restrict__ grad, const int64_t* __restrict__ ids,
                                           typename Acc<T>::type* __restrict__ partial, int64_t N, int64_t L,
                                           int64_t keep, int64_t D) {
  VK_GRID_STRIDE(i, N * D) {
    const int64_t n = i / D, d = i - n * D;
    typename Acc<T>::type acc = 0;
    for (int64_t l = 0; l < L; ++l) {
      if (ids[n * L + l] >= keep) acc += to_acc(grad[(n * (L + 1) + 1 + l) * D + d]);
    }
    partial[i] = acc;
  }
}

#undef VK_GRID_STRIDE

constexpr int kMaskingThreads = 256;

template <typename T>
cudaError_t launch_gather_rows(const T* src, const int64_t* idx, const T* add, T* out, int64_t N, int64_t K,
                               int64_t S, int64_t D, int64_t idx_batch_stride, int64_t add_batch_stride,
                               cudaStream_t stream) {
  gather_rows_kernel<T><<<grid_for(N * K * D, kMaskingThreads), kMaskingThreads, 0, stream>>>(
      src, idx, add, out, N, K, S, D, idx_batch_stride, add_batch_stride);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_restore_and_mask(const int64_t* shuffle, int64_t* restore, T* mask, int64_t N, int64_t L,
                                    int64_t len_keep, cudaStream_t stream) {
  restore_and_mask_kernel<T><<<grid_for(N * L, kMaskingThreads), kMaskingThreads, 0, stream>>>(
      shuffle, restore, mask, N, L, len_keep);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_unshuffle_fwd(const T* x, const int64_t* ids, const T* token, const T* pos, T* out, int64_t N,
                                 int64_t L, int64_t keep, int64_t D, int64_t pos_batch_stride, cudaStream_t stream) {
  unshuffle_fwd_kernel<T><<<grid_for(N * (L + 1) * D, kMaskingThreads), kMaskingThreads, 0, stream>>>(
      x, ids, token, pos, out, N, L, keep, D, pos_batch_stride);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_unshuffle_bwd(const T* grad, const int64_t* ids, T* grad_x, typename Acc<T>::type* partial,
                                 int64_t N, int64_t L, int64_t keep, int64_t D, cudaStream_t stream) {
  unshuffle_bwd_scatter_kernel<T><<<grid_for(N * (L + 1) * D, kMaskingThreads), kMaskingThreads, 0, stream>>>(
      grad, ids, grad_x, N, L, keep, D);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  unshuffle_bwd_token_kernel<T><<<grid_for(N * D, kMaskingThreads), kMaskingThreads, 0, stream>>>(
      grad, ids, partial, N, L, keep, D);
  return cudaGetLastError();
}

#define VK_INSTANTIATE(T)                                                                                         \
  template cudaError_t launch_gather_rows<T>(const T*, const int64_t*, const T*, T*, int64_t, int64_t, int64_t,   \
                                             int64_t, int64_t, int64_t, cudaStream_t);                            \
  template cudaError_t launch_restore_and_mask<T>(const int64_t*, int64_t*, T*, int64_t, int64_t, int64_t,       \
                                                  cudaStream_t);                                                  \
  template cudaError_t launch_unshuffle_fwd<T>(const T*, const int64_t*, const T*, const T*, T*, int64_t, int64_t, \
                                               int64_t, int64_t, int64_t, cudaStream_t);                          \
  template cudaError_t launch_unshuffle_bwd<T>(const T*, const int64_t*, T*, Acc<T>::type*, int64_t, int64_t,    \
                                               int64_t, int64_t, cudaStream_t);
VK_MASKING_TYPES(VK_INSTANTIATE)
#undef VK_INSTANTIATE

}  // namespace cuda
}  // namespace vitkernels
