// Forward kernel of the CUDA window attention and its launcher (declared in window_attention.cuh, instantiated in
// window_attention_fwd_kernels.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "window_attention.cuh"
#include "window_attention_prologue.cuh"

namespace vitkernels {
namespace cuda {
namespace wa_detail {

// ---------------------------------------------------------------------------------------------------------------
// Forward: grid (windows, nH, chunks), thread = (query row i, slice). The block's work, for either way of forming
// the scores (DotProductScores: V1; CosineScores: Swin V2, window_attention_v2_fwd.cuh) and either window geometry
// (WindowGeometry; WindowGeometry3D: window_attention_3d_fwd.cuh).

template <typename T, int G, typename Scores, typename Geometry>
__device__ __forceinline__ void window_attention_fwd_block(const T* __restrict__ qkv, const T* __restrict__ pad_row,
                                                           const typename Acc<T>::type* __restrict__ table,
                                                           T* __restrict__ out, typename Acc<T>::type* __restrict__ lse,
                                                           const WindowAttentionShapeT<Geometry>& p,
                                                           const Scores& scores) {
  using A = typename Acc<T>::type;
  constexpr int KT = Tile<T>::value;
  constexpr int RS = G * kSliceStride;  // tile row stride
  static_assert(KT % kSub == 0, "key tiles are whole softmax steps");
  __shared__ A k_s[KT * RS];
  __shared__ A v_s[KT * RS];
  __shared__ typename WindowSharedOf<A, Geometry, 2 * KT * RS * sizeof(A)>::type win;

  const int64_t w = blockIdx.x;
  const int h = blockIdx.y;
  const int slice = threadIdx.x % G;
  const int i = blockIdx.z * (blockDim.x / G) + threadIdx.x / G;
  load_window(p, table, w, h, win);

  // Rows past N compute on row N - 1's data (every thread takes part in the shuffles) and store nothing.
  const bool row = i < p.N;
  const int ic = row ? i : p.N - 1;
  const int64_t src_i = win.src[ic];
  const int code_i = win.code[ic] + p.rel_offset;
  const int region_i = win.region[ic];
  const bool tab_staged = win.staged(p.table_rows);
  const A* const tab_column = table + h;  // read only when the table is not staged
  A q[kSlice], o[kSlice];
  load_slice(p, qkv, pad_row, src_i, h, 0, slice, scores.query_mul(), q);
  scores.template normalize<G>(q);
#pragma unroll
  for (int d = 0; d < kSlice; ++d) o[d] = A(0);

  A m = A(0), l = A(0);  // running max and sum of exp(S - m); m is set by the first step
  for (int j0 = 0; j0 < p.N; j0 += KT) {
    __syncthreads();  // the previous tile is consumed
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, win.src, j0, h, 1, A(1), false, k_s);
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, win.src, j0, h, 2, A(1), false, v_s);
    __syncthreads();
    scores.template normalize_tile<G, KT>(k_s);
    const int nk = p.N - j0 < KT ? p.N - j0 : KT;
#pragma unroll 1
    for (int js = 0; js < nk; js += kSub) {
      A s[kSub];
      A step_max = A(0);
#pragma unroll
      for (int jj = 0; jj < kSub; ++jj) {
        const A* k = k_s + (js + jj) * RS + slice * kSliceStride;  // rows past nk are zero: in the tile, unused
        A dot = A(0);
#pragma unroll
        for (int d = 0; d < kSlice; ++d) dot += q[d] * k[d];
        dot = scores.logits(row_sum<G>(dot));
        s[jj] = A(0);
        if (js + jj < nk) {
          const int j = j0 + js + jj;
          dot = dot + win.bias(code_i - win.code[j], tab_staged, tab_column, p.nH);
          dot = dot + (win.region[j] != region_i ? mask_value<A>() : A(0));
          s[jj] = dot;
          step_max = jj == 0 ? dot : max_acc(step_max, dot);
        }
      }
      const bool first = j0 == 0 && js == 0;
      const A m_new = first ? step_max : max_acc(m, step_max);
      const A alpha = first ? A(0) : exp_acc(m - m_new);
      l *= alpha;
#pragma unroll
      for (int d = 0; d < kSlice; ++d) o[d] *= alpha;
#pragma unroll
      for (int jj = 0; jj < kSub; ++jj) {
        if (js + jj < nk) {
          const A e = exp_acc(s[jj] - m_new);
          const A* v = v_s + (js + jj) * RS + slice * kSliceStride;
          l += e;
#pragma unroll
          for (int d = 0; d < kSlice; ++d) o[d] += e * v[d];
        }
      }
      m = m_new;
    }
  }

  if (row) {
    if (slice == 0) lse[(w * p.nH + h) * p.N + i] = m + log_acc(l);
    if (src_i >= 0) {
      const A inv = A(1) / l;
      T* orow = out + src_i * p.C + static_cast<int64_t>(h) * p.hd;
#pragma unroll
      for (int d = 0; d < kSlice; ++d) {
        const int dim = slice * kSlice + d;
        if (dim < p.hd) orow[dim] = from_acc<T>(o[d] * inv);
      }
    }
  }
}

// Launch bounds of the forward kernels: at most 256 threads and, for G = 1, at least one block per multiprocessor.
// Left to its own heuristic, ptxas (CUDA 13.0) caps the G = 1 instantiations at 128 registers and spills 68 / 80 bytes
// (sm_80 / sm_90; tools/compile_gate_cuda.py fails on that); with the hint they keep everything in registers (178 /
// 210). A minimum of 0 blocks emits no .minnctapersm, so G = 2, 4 compile exactly as without it (~100 registers, no
// spill).
template <int G> constexpr int kForwardMinBlocks = G == 1 ? 1 : 0;

template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads, kForwardMinBlocks<G>)
    window_attention_fwd_kernel(const T* __restrict__ qkv, const T* __restrict__ pad_row,
                                const typename Acc<T>::type* __restrict__ table, T* __restrict__ out,
                                typename Acc<T>::type* __restrict__ lse, const WindowAttentionShape p,
                                const typename Acc<T>::type scale) {
  window_attention_fwd_block<T, G>(qkv, pad_row, table, out, lse, p, DotProductScores<typename Acc<T>::type>{scale});
}

}  // namespace wa_detail

// Declared, with its contract, in window_attention.cuh.
template <typename T>
cudaError_t launch_window_attention_fwd(const T* qkv, const T* pad_row, const typename Acc<T>::type* table, T* out,
                                        typename Acc<T>::type* lse, const WindowAttentionShape& p, double scale,
                                        cudaStream_t stream) {
  using A = typename Acc<T>::type;
  return wa_detail::dispatch_forward(p, [&](auto tag, const dim3& grid, int threads) {
    constexpr int G = decltype(tag)::value;
    wa_detail::window_attention_fwd_kernel<T, G><<<grid, threads, 0, stream>>>(qkv, pad_row, table, out, lse, p,
                                                                               static_cast<A>(scale));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vitkernels
