// Backward kernels of the CUDA Swin V2 window attention (dq with the per-block d tau partials; dk, dv and the
// per-group bias-gradient partials) and their launcher (declared in window_attention_v2.cuh, instantiated in
// window_attention_v2_bwd_kernels.cu): V1's backward blocks (window_attention_bwd.cuh) with cosine scores. The
// table gradient is V1's launch_window_attention_bias_grad.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "window_attention.cuh"
#include "window_attention_bwd.cuh"
#include "window_attention_prologue.cuh"
#include "window_attention_v2.cuh"
#include "window_attention_v2_prologue.cuh"

namespace vitkernels {
namespace cuda {
namespace wa_detail {

// Backward (a), dq and d tau: grid (windows, nH, chunks), thread = (query row i, slice). V1's dq block (the q part
// of grad_qkv, delta), then this block's share of d tau_h, sum over its real rows of q^_i . G_i in thread order, into
// d_scale[(w * nH + h) * chunks + chunk].
template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_v2_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                      const T* __restrict__ pad_row, const typename Acc<T>::type* __restrict__ table,
                                      const typename Acc<T>::type* __restrict__ scale, const T* __restrict__ out,
                                      const typename Acc<T>::type* __restrict__ lse,
                                      typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                      typename Acc<T>::type* __restrict__ d_scale, const WindowAttentionShape p) {
  using A = typename Acc<T>::type;
  const A share = window_attention_bwd_dq_block<T, G>(grad_out, qkv, pad_row, table, out, lse, delta, grad_qkv, p,
                                                      CosineScores<A>{scale[blockIdx.y]});
  const A total = block_sum_ordered(share);
  if (threadIdx.x == 0) {
    d_scale[(static_cast<int64_t>(blockIdx.x) * p.nH + blockIdx.y) * gridDim.z + blockIdx.z] = total;
  }
}

// Backward (b), dk, dv, d_bias: grid (groups, nH, chunks), thread = (key row j, slice): V1's dk / dv block (the k, v
// parts of grad_qkv; d_bias and d_pad partials as V1).
template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_v2_bwd_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                        const T* __restrict__ pad_row,
                                        const typename Acc<T>::type* __restrict__ table,
                                        const typename Acc<T>::type* __restrict__ scale,
                                        const typename Acc<T>::type* __restrict__ lse,
                                        const typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                        typename Acc<T>::type* __restrict__ d_bias,
                                        typename Acc<T>::type* __restrict__ d_pad, const WindowAttentionShape p,
                                        const int64_t windows_per_group) {
  using A = typename Acc<T>::type;
  window_attention_bwd_dkdv_block<T, G>(grad_out, qkv, pad_row, table, lse, delta, grad_qkv, d_bias, d_pad, p,
                                        CosineScores<A>{scale[blockIdx.y]}, windows_per_group);
}

}  // namespace wa_detail

// Declared, with its contract, in window_attention_v2.cuh.
template <typename T>
cudaError_t launch_window_attention_v2_bwd(const T* grad_out, const T* qkv, const T* pad_row,
                                           const typename Acc<T>::type* table, const typename Acc<T>::type* scale,
                                           const T* out, const typename Acc<T>::type* lse,
                                           typename Acc<T>::type* delta, T* grad_qkv,
                                           typename Acc<T>::type* d_scale, typename Acc<T>::type* d_bias,
                                           typename Acc<T>::type* d_pad, const WindowAttentionShape& p,
                                           int64_t windows_per_group, cudaStream_t stream) {
  return wa_detail::dispatch_backward(p, windows_per_group, [&](auto tag, const dim3& grid_dq, const dim3& grid_dkdv,
                                                                int threads) {
    constexpr int G = decltype(tag)::value;
    wa_detail::window_attention_v2_bwd_dq_kernel<T, G><<<grid_dq, threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, scale, out, lse, delta, grad_qkv, d_scale, p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    wa_detail::window_attention_v2_bwd_dkdv_kernel<T, G><<<grid_dkdv, threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, scale, lse, delta, grad_qkv, d_bias, d_pad, p, windows_per_group);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vitkernels
