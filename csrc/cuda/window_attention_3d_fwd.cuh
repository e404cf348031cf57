// Forward kernel of the CUDA 3D window attention and its launcher (declared in window_attention_3d.cuh, instantiated
// in window_attention_3d_fwd_kernels.cu): the 2D op's forward block (window_attention_fwd.cuh) over WindowGeometry3D.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "window_attention.cuh"
#include "window_attention_3d.cuh"
#include "window_attention_fwd.cuh"
#include "window_attention_prologue.cuh"

namespace vitkernels {
namespace cuda {
namespace wa_detail {

// Grid (windows, nH, chunks), thread = (query row i, slice); launch bounds as the 2D forward's.
template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads, kForwardMinBlocks<G>)
    window_attention_3d_fwd_kernel(const T* __restrict__ qkv, const T* __restrict__ pad_row,
                                   const typename Acc<T>::type* __restrict__ table, T* __restrict__ out,
                                   typename Acc<T>::type* __restrict__ lse, const WindowAttentionShape3D p,
                                   const typename Acc<T>::type scale) {
  window_attention_fwd_block<T, G>(qkv, pad_row, table, out, lse, p, DotProductScores<typename Acc<T>::type>{scale});
}

}  // namespace wa_detail

// Declared, with its contract, in window_attention_3d.cuh.
template <typename T>
cudaError_t launch_window_attention_3d_fwd(const T* qkv, const T* pad_row, const typename Acc<T>::type* table, T* out,
                                           typename Acc<T>::type* lse, const WindowAttentionShape3D& p, double scale,
                                           cudaStream_t stream) {
  using A = typename Acc<T>::type;
  return wa_detail::dispatch_forward(p, [&](auto tag, const dim3& grid, int threads) {
    constexpr int G = decltype(tag)::value;
    wa_detail::window_attention_3d_fwd_kernel<T, G><<<grid, threads, 0, stream>>>(qkv, pad_row, table, out, lse, p,
                                                                                  static_cast<A>(scale));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vitkernels
