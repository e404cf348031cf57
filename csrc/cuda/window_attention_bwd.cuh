// Backward kernels of the CUDA window attention (dq; dk, dv and the per-group bias-gradient partials; the bias-table
// gradient) and their launchers (declared in window_attention.cuh, instantiated in window_attention_bwd_kernels.cu).
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
// Backward (a), dq: grid (windows, nH, chunks), thread = (query row i, slice). Writes the q part of grad_qkv for
// real tokens and delta_i = dO_i . O_i (0 for padded rows) for kernel (b). The block's work, for either way of
// forming the scores (DotProductScores: V1, 3D; CosineScores: Swin V2, window_attention_v2_bwd.cuh) and either window
// geometry (WindowGeometry; WindowGeometry3D: window_attention_3d_bwd.cuh); returns the thread's
// share of the variant's other gradients (Scores::query_grad; 0 but for the slice-0 thread of a real row).

template <typename T, int G, typename Scores, typename Geometry>
__device__ __forceinline__ typename Acc<T>::type window_attention_bwd_dq_block(
    const T* __restrict__ grad_out, const T* __restrict__ qkv, const T* __restrict__ pad_row,
    const typename Acc<T>::type* __restrict__ table, const T* __restrict__ out,
    const typename Acc<T>::type* __restrict__ lse, typename Acc<T>::type* __restrict__ delta,
    T* __restrict__ grad_qkv, const WindowAttentionShapeT<Geometry>& p, const Scores& scores) {
  using A = typename Acc<T>::type;
  constexpr int KT = Tile<T>::value;
  constexpr int RS = G * kSliceStride;
  __shared__ A k_s[KT * RS];
  __shared__ A v_s[KT * RS];
  __shared__ typename WindowSharedOf<A, Geometry, 2 * KT * RS * sizeof(A)>::type win;

  const int64_t w = blockIdx.x;
  const int h = blockIdx.y;
  const int slice = threadIdx.x % G;
  const int i = blockIdx.z * (blockDim.x / G) + threadIdx.x / G;
  load_window(p, table, w, h, win);

  // Only real query rows have a gradient: a padded row was cropped from the output (dO = 0, so dS = 0). The other
  // threads compute on zeros (every thread takes part in the shuffles) and store nothing.
  const int ic = i < p.N ? i : p.N - 1;
  const int64_t src_i = win.src[ic];
  const bool row = i < p.N && src_i >= 0;
  const int code_i = win.code[ic] + p.rel_offset;
  const int region_i = win.region[ic];
  const bool tab_staged = win.staged(p.table_rows);
  const A* const tab_column = table + h;  // read only when the table is not staged
  const int64_t head = static_cast<int64_t>(h) * p.hd;
  A q[kSlice], dout[kSlice], dq[kSlice];
  A delta_i = A(0), lse_i = A(0);
#pragma unroll
  for (int d = 0; d < kSlice; ++d) {
    const int dim = slice * kSlice + d;
    q[d] = A(0);
    dout[d] = A(0);
    dq[d] = A(0);
    if (row && dim < p.hd) {
      q[d] = to_acc(qkv[src_i * 3 * p.C + head + dim]) * scores.query_mul();
      dout[d] = to_acc(grad_out[src_i * p.C + head + dim]);
      delta_i += dout[d] * to_acc(out[src_i * p.C + head + dim]);
    }
  }
  delta_i = row_sum<G>(delta_i);
  const A q_state = scores.template normalize<G>(q);
  if (row) lse_i = lse[(w * p.nH + h) * p.N + i];
  if (i < p.N && slice == 0) delta[(w * p.nH + h) * p.N + i] = delta_i;

  for (int j0 = 0; j0 < p.N; j0 += KT) {
    __syncthreads();
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, win.src, j0, h, 1, A(1), false, k_s);
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, win.src, j0, h, 2, A(1), false, v_s);
    __syncthreads();
    scores.template normalize_tile<G, KT>(k_s);
    const int nk = p.N - j0 < KT ? p.N - j0 : KT;
    for (int jj = 0; jj < nk; ++jj) {
      const int j = j0 + jj;
      const A* k = k_s + jj * RS + slice * kSliceStride;
      const A* v = v_s + jj * RS + slice * kSliceStride;
      A s = A(0), dp = A(0);
#pragma unroll
      for (int d = 0; d < kSlice; ++d) {
        s += q[d] * k[d];
        dp += dout[d] * v[d];
      }
      s = scores.logits(row_sum<G>(s));
      dp = row_sum<G>(dp);
      s = s + win.bias(code_i - win.code[j], tab_staged, tab_column, p.nH);
      s = s + (win.region[j] != region_i ? mask_value<A>() : A(0));
      const A ds = exp_acc(s - lse_i) * (dp - delta_i);
#pragma unroll
      for (int d = 0; d < kSlice; ++d) dq[d] += ds * k[d];
    }
  }

  const A share = scores.template query_grad<G>(q, q_state, dq);
  if (row) {
    T* grow = grad_qkv + src_i * 3 * p.C + head;
#pragma unroll
    for (int d = 0; d < kSlice; ++d) {
      const int dim = slice * kSlice + d;
      if (dim < p.hd) grow[dim] = from_acc<T>(dq[d] * scores.query_mul());
    }
  }
  return row && slice == 0 ? share : A(0);
}

template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                   const T* __restrict__ pad_row, const typename Acc<T>::type* __restrict__ table,
                                   const T* __restrict__ out, const typename Acc<T>::type* __restrict__ lse,
                                   typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                   const WindowAttentionShape p, const typename Acc<T>::type scale) {
  window_attention_bwd_dq_block<T, G>(grad_out, qkv, pad_row, table, out, lse, delta, grad_qkv, p,
                                      DotProductScores<typename Acc<T>::type>{scale});
}

// ---------------------------------------------------------------------------------------------------------------
// Backward (b), dk, dv, d_bias: grid (groups, nH, chunks), thread = (key row j, slice); the group's windows are
// [group * windows_per_group, min(... + windows_per_group, windows)).
//   d_bias: (groups, nH, N, N), zero on entry; key row j's slice-0 thread adds dS_ij of every window into column j.
//   d_pad:  (groups * chunks, nH, 2, hd), written: this block's sum over its windows and padded key rows of (dk, dv).
// The block's work, for either way of forming the scores (V1, 3D; Swin V2: window_attention_v2_bwd.cuh) and either
// window geometry (3D: window_attention_3d_bwd.cuh).

template <typename T, int G, typename Scores, typename Geometry>
__device__ __forceinline__ void window_attention_bwd_dkdv_block(
    const T* __restrict__ grad_out, const T* __restrict__ qkv, const T* __restrict__ pad_row,
    const typename Acc<T>::type* __restrict__ table, const typename Acc<T>::type* __restrict__ lse,
    const typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
    typename Acc<T>::type* __restrict__ d_bias, typename Acc<T>::type* __restrict__ d_pad,
    const WindowAttentionShapeT<Geometry>& p, const Scores& scores, const int64_t windows_per_group) {
  using A = typename Acc<T>::type;
  constexpr int QT = Tile<T>::value;
  constexpr int RS = G * kSliceStride;
  constexpr int HDP = G * kSlice;
  // The padded-key reduction stages one HDP-row per warp in q_s and in do_s.
  static_assert((kWindowAttentionMaxThreads / 32) * HDP <= QT * RS, "staging does not fit the query tiles");
  __shared__ A q_s[QT * RS];   // q of real query rows as the scores take them (V1: scale q), 0 for padded ones
  __shared__ A do_s[QT * RS];  // dO of real query rows, 0 for padded ones
  __shared__ A lse_s[QT];
  __shared__ A delta_s[QT];
  __shared__ A pad_s[2 * HDP];  // this block's sums of the padded key rows' dk (first HDP) and dv
  __shared__ typename WindowSharedOf<A, Geometry, (2 * QT * RS + 2 * QT + 2 * HDP) * sizeof(A)>::type win;

  const int64_t group = blockIdx.x;
  const int h = blockIdx.y;
  const int slice = threadIdx.x % G;
  const int j = blockIdx.z * (blockDim.x / G) + threadIdx.x / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t head = static_cast<int64_t>(h) * p.hd;
  const int64_t w_begin = group * windows_per_group;
  const int64_t w_end = w_begin + windows_per_group < p.windows ? w_begin + windows_per_group : p.windows;

  load_codes_and_table(p, table, h, win);
  const bool tab_staged = win.staged(p.table_rows);
  const A* const tab_column = table + h;  // read only when the table is not staged
  for (int e = threadIdx.x; e < 2 * HDP; e += blockDim.x) pad_s[e] = A(0);

  // Rows past N compute on row N - 1's data (every thread takes part in the shuffles) and store nothing.
  const bool key = j < p.N;
  const int jc = key ? j : p.N - 1;
  A* bias_col = d_bias + (group * p.nH + h) * p.N * p.N + jc;  // + i * N: dS_ij summed over the group's windows
  for (int64_t w = w_begin; w < w_end; ++w) {
    __syncthreads();  // the previous window's tokens, tiles and staging are consumed; codes, table are loaded
    load_window_tokens(p, w, win);
    __syncthreads();

    const int64_t src_j = win.src[jc];
    const int code_j = win.code[jc] - p.rel_offset;
    const int region_j = win.region[jc];
    A k[kSlice], v[kSlice], dk[kSlice], dv[kSlice];
    load_slice(p, qkv, pad_row, src_j, h, 1, slice, A(1), k);
    load_slice(p, qkv, pad_row, src_j, h, 2, slice, A(1), v);
    const A k_state = scores.template normalize<G>(k);
#pragma unroll
    for (int d = 0; d < kSlice; ++d) { dk[d] = A(0); dv[d] = A(0); }

    const int64_t lse_base = (w * p.nH + h) * p.N;
    for (int i0 = 0; i0 < p.N; i0 += QT) {
      __syncthreads();
      load_qkv_tile<T, G, QT>(p, qkv, pad_row, win.src, i0, h, 0, scores.query_mul(), true, q_s);
      for (int e = threadIdx.x; e < QT * HDP; e += blockDim.x) {
        const int ii = e / HDP, dim = e - ii * HDP;
        const int i = i0 + ii;
        A val = A(0);
        if (i < p.N && dim < p.hd && win.src[i] >= 0) val = to_acc(grad_out[win.src[i] * p.C + head + dim]);
        do_s[ii * RS + (dim / kSlice) * kSliceStride + dim % kSlice] = val;
      }
      for (int ii = threadIdx.x; ii < QT; ii += blockDim.x) {
        const int i = i0 + ii;
        const bool real = i < p.N && win.src[i] >= 0;
        lse_s[ii] = real ? lse[lse_base + i] : A(0);
        delta_s[ii] = real ? delta[lse_base + i] : A(0);
      }
      __syncthreads();
      scores.template normalize_tile<G, QT>(q_s);
      const int nq = p.N - i0 < QT ? p.N - i0 : QT;
      for (int ii = 0; ii < nq; ++ii) {
        const int i = i0 + ii;
        if (win.src[i] < 0) continue;  // a padded query row (the same for the whole block): P dO = 0 and dS = 0
        const A* qi = q_s + ii * RS + slice * kSliceStride;
        const A* doi = do_s + ii * RS + slice * kSliceStride;
        A s = A(0), dp = A(0);
#pragma unroll
        for (int d = 0; d < kSlice; ++d) {
          s += k[d] * qi[d];
          dp += v[d] * doi[d];
        }
        s = scores.logits(row_sum<G>(s));
        dp = row_sum<G>(dp);
        s = s + win.bias(win.code[i] - code_j, tab_staged, tab_column, p.nH);
        s = s + (win.region[i] != region_j ? mask_value<A>() : A(0));
        const A pr = exp_acc(s - lse_s[ii]);
        const A ds = pr * (dp - delta_s[ii]);
#pragma unroll
        for (int d = 0; d < kSlice; ++d) {
          dv[d] += pr * doi[d];
          dk[d] += ds * qi[d];
        }
        if (key && slice == 0) bias_col[static_cast<int64_t>(i) * p.N] += ds;
      }
    }

    scores.template key_grad<G>(k, k_state, dk);

    if (key && src_j >= 0) {
      T* grow = grad_qkv + src_j * 3 * p.C + head;
#pragma unroll
      for (int d = 0; d < kSlice; ++d) {
        const int dim = slice * kSlice + d;
        if (dim < p.hd) {
          grow[p.C + dim] = from_acc<T>(dk[d]);
          grow[2 * p.C + dim] = from_acc<T>(dv[d]);
        }
      }
    }

    // Padded key rows are the qkv bias: their (dk, dv) go to its k and v parts. Reduced in a fixed order: over a
    // warp's rows by shuffles (lanes 0..G-1 end with the warp's slices), then over the warps in order, through
    // q_s / do_s (free after the barrier).
    const bool pad_key = key && src_j < 0;
    if (__syncthreads_or(pad_key)) {
#pragma unroll
      for (int d = 0; d < kSlice; ++d) {
        A a = pad_key ? dk[d] : A(0);
        A b = pad_key ? dv[d] : A(0);
#pragma unroll
        for (int off = 16; off >= G; off >>= 1) {
          a += __shfl_xor_sync(0xffffffffu, a, off);
          b += __shfl_xor_sync(0xffffffffu, b, off);
        }
        if (lane < G) {  // lane == slice
          q_s[warp * HDP + lane * kSlice + d] = a;
          do_s[warp * HDP + lane * kSlice + d] = b;
        }
      }
      __syncthreads();
      for (int e = threadIdx.x; e < 2 * HDP; e += blockDim.x) {
        const A* stage = e < HDP ? q_s : do_s;
        const int dim = e < HDP ? e : e - HDP;
        A sum = A(0);
        for (int wp = 0; wp < warps; ++wp) sum += stage[wp * HDP + dim];
        pad_s[e] += sum;
      }
    }
  }

  __syncthreads();
  A* pad_out = d_pad + ((group * gridDim.z + blockIdx.z) * p.nH + h) * 2 * p.hd;
  for (int e = threadIdx.x; e < 2 * p.hd; e += blockDim.x) {
    const int part = e / p.hd, dim = e - part * p.hd;
    pad_out[e] = pad_s[part * HDP + dim];
  }
}

template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_bwd_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                     const T* __restrict__ pad_row, const typename Acc<T>::type* __restrict__ table,
                                     const typename Acc<T>::type* __restrict__ lse,
                                     const typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                     typename Acc<T>::type* __restrict__ d_bias,
                                     typename Acc<T>::type* __restrict__ d_pad, const WindowAttentionShape p,
                                     const typename Acc<T>::type scale, const int64_t windows_per_group) {
  window_attention_bwd_dkdv_block<T, G>(grad_out, qkv, pad_row, table, lse, delta, grad_qkv, d_bias, d_pad, p,
                                        DotProductScores<typename Acc<T>::type>{scale}, windows_per_group);
}

// grad_table[r, h] = sum of d_bias[h, i, j] (already summed over windows) over the pairs with relative_index(i, j)
// = r: for each query i at most one key j. One thread per table entry, a fixed order: deterministic. (Used with
// D = double.)
template <typename D>
__global__ void window_attention_bias_grad_kernel(const D* __restrict__ d_bias, D* __restrict__ grad_table, int wh,
                                                  int ww, int nH) {
  const int64_t total = static_cast<int64_t>(2 * wh - 1) * (2 * ww - 1) * nH;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int N = wh * ww;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int r = static_cast<int>(e / nH), h = static_cast<int>(e - static_cast<int64_t>(r) * nH);
    const int dy = r / (2 * ww - 1) - (wh - 1);  // y_i - y_j
    const int dx = r % (2 * ww - 1) - (ww - 1);  // x_i - x_j
    D sum = D(0);
    for (int yi = 0; yi < wh; ++yi) {
      const int yj = yi - dy;
      if (yj < 0 || yj >= wh) continue;
      for (int xi = 0; xi < ww; ++xi) {
        const int xj = xi - dx;
        if (xj < 0 || xj >= ww) continue;
        sum += d_bias[(static_cast<int64_t>(h) * N + yi * ww + xi) * N + yj * ww + xj];
      }
    }
    grad_table[e] = sum;
  }
}

}  // namespace wa_detail

// Declared, with its contract, in window_attention.cuh.
template <typename T>
cudaError_t launch_window_attention_bwd(const T* grad_out, const T* qkv, const T* pad_row,
                                        const typename Acc<T>::type* table, const T* out,
                                        const typename Acc<T>::type* lse, typename Acc<T>::type* delta, T* grad_qkv,
                                        typename Acc<T>::type* d_bias, typename Acc<T>::type* d_pad,
                                        const WindowAttentionShape& p, double scale, int64_t windows_per_group,
                                        cudaStream_t stream) {
  using A = typename Acc<T>::type;
  return wa_detail::dispatch_backward(p, windows_per_group, [&](auto tag, const dim3& grid_dq, const dim3& grid_dkdv,
                                                                int threads) {
    constexpr int G = decltype(tag)::value;
    wa_detail::window_attention_bwd_dq_kernel<T, G><<<grid_dq, threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, out, lse, delta, grad_qkv, p, static_cast<A>(scale));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    wa_detail::window_attention_bwd_dkdv_kernel<T, G><<<grid_dkdv, threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, lse, delta, grad_qkv, d_bias, d_pad, p, static_cast<A>(scale),
        windows_per_group);
    return cudaGetLastError();
  });
}

template <typename D>
cudaError_t launch_window_attention_bias_grad(const D* d_bias, D* grad_table, int64_t wh, int64_t ww,
                                              int64_t num_heads, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = (2 * wh - 1) * (2 * ww - 1) * num_heads;
  if (total <= 0) return cudaSuccess;
  wa_detail::window_attention_bias_grad_kernel<D><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
      d_bias, grad_table, static_cast<int>(wh), static_cast<int>(ww), static_cast<int>(num_heads));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vitkernels
