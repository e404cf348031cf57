// Forward kernel of the CUDA Swin V2 window attention and its launcher (declared in window_attention_v2.cuh,
// instantiated in window_attention_v2_fwd_kernels.cu): V1's forward block (window_attention_fwd.cuh) with cosine
// scores.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "window_attention.cuh"
#include "window_attention_fwd.cuh"
#include "window_attention_prologue.cuh"
#include "window_attention_v2.cuh"
#include "window_attention_v2_prologue.cuh"

namespace vitkernels {
namespace cuda {
namespace wa_detail {

// Grid (windows, nH, chunks), thread = (query row i, slice); launch bounds as V1's forward.
template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads, kForwardMinBlocks<G>)
    window_attention_v2_fwd_kernel(const T* __restrict__ qkv, const T* __restrict__ pad_row,
                                   const typename Acc<T>::type* __restrict__ table,
                                   const typename Acc<T>::type* __restrict__ scale, T* __restrict__ out,
                                   typename Acc<T>::type* __restrict__ lse, const WindowAttentionShape p) {
  using A = typename Acc<T>::type;
  window_attention_fwd_block<T, G>(qkv, pad_row, table, out, lse, p, CosineScores<A>{scale[blockIdx.y]});
}

}  // namespace wa_detail

// Declared, with its contract, in window_attention_v2.cuh.
template <typename T>
cudaError_t launch_window_attention_v2_fwd(const T* qkv, const T* pad_row, const typename Acc<T>::type* table,
                                           const typename Acc<T>::type* scale, T* out, typename Acc<T>::type* lse,
                                           const WindowAttentionShape& p, cudaStream_t stream) {
  return wa_detail::dispatch_forward(p, [&](auto tag, const dim3& grid, int threads) {
    constexpr int G = decltype(tag)::value;
    wa_detail::window_attention_v2_fwd_kernel<T, G><<<grid, threads, 0, stream>>>(qkv, pad_row, table, scale, out,
                                                                                  lse, p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vitkernels
