// CUDA kernels for MAE / MSN token masking (semantics: vitkernels/reference/masking.py): the launch API the torch
// binding (masking.cpp) calls. Host code only (no torch headers, no kernels): the kernels and these launchers are
// compiled by nvcc in masking_kernels.cu, for the element types of VK_MASKING_TYPES, the binding by the host compiler.
// One thread per output element, grid-stride loops, int64 indexing; math in float (double for double inputs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"  // Acc

namespace vitkernels {
namespace cuda {

// out (N, K, D): out[n, k, d] = src[n, j, d] (+ add[n or 0, j, d]) with j = idx[n * idx_batch_stride + k]; 0 where
// j is outside [0, S). src (N, S, D); add (N or 1, S, D) with add_batch_stride S * D or 0, or null.
template <typename T>
cudaError_t launch_gather_rows(const T* src, const int64_t* idx, const T* add, T* out, int64_t N, int64_t K,
                               int64_t S, int64_t D, int64_t idx_batch_stride, int64_t add_batch_stride,
                               cudaStream_t stream);

// From the stably sorted order shuffle (N, L): restore[n, shuffle[n, r]] = r, mask[n, shuffle[n, r]] = (r >=
// len_keep).
template <typename T>
cudaError_t launch_restore_and_mask(const int64_t* shuffle, int64_t* restore, T* mask, int64_t N, int64_t L,
                                    int64_t len_keep, cudaStream_t stream);

// Decoder input out (N, L + 1, D) from x (N, keep + 1, D): the class token, then x's row of each position's rank
// ids (N, L) below keep, else token (D); + pos (N or 1, L + 1, D) with pos_batch_stride, or null.
template <typename T>
cudaError_t launch_unshuffle_fwd(const T* x, const int64_t* ids, const T* token, const T* pos, T* out, int64_t N,
                                 int64_t L, int64_t keep, int64_t D, int64_t pos_batch_stride, cudaStream_t stream);

// Its backward: grad_x (N, keep + 1, D) (zero-filled by the caller) gets the visible tokens' rows of grad (N, L + 1,
// D); partial (N, D) in the compute type the sum over masked positions (the caller sums it over N).
template <typename T>
cudaError_t launch_unshuffle_bwd(const T* grad, const int64_t* ids, T* grad_x, typename Acc<T>::type* partial,
                                 int64_t N, int64_t L, int64_t keep, int64_t D, cudaStream_t stream);

// The element types the binding dispatches over (AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf)).
#define VK_MASKING_TYPES(X) X(float) X(double) X(__half) X(__nv_bfloat16)

}  // namespace cuda
}  // namespace vitkernels
