// CUDA kernels for Swin V2 (shifted) window attention: scaled cosine attention with a continuous position bias,
// fused from the qkv Linear's output in original NHWC token order to the attention output in original order
// (semantics: vitkernels/reference/window_attention_v2.py; the CPU kernels of csrc/cpu/window_attention_v2_kernel.h
// compute the same thing). Runtime-only: compiled by `nvcc -c` in CI without torch (csrc/cuda/check); the torch
// binding is csrc/cuda/window_attention_v2.cu.
//
// The layout and the machinery are V1's plain CUDA fallback (window_attention.cuh, included: its shape, block
// layout, token / code / table staging, tile loads, row sums and the table-gradient scatter are used as they are):
// a token row belongs to G = 1, 2 or 4 adjacent threads holding 32-wide slices of the head dimension; keys (forward,
// dq) or queries (dk, dv) are staged in shared memory tiles. What V2 adds:
//   q^_i = q_i / max(|q_i|, eps), k^_j likewise (eps = 1e-12, F.normalize; staged tiles are normalised in place),
//   S_ij = tau_h (q^_i . k^_j) + table[rel(i, j), h] + (-100 if the tokens' regions differ)
//   forward   online softmax over the key tiles; lse_i = m_i + log(l_i).
//   bwd dq    G_i = sum_j dS_ij k^_j; dq_i = tau (G_i - q^_i (q^_i . G_i)) / |q_i| (tau G_i / eps where |q_i| < eps);
//             d tau partial = sum over the block's real rows of q^_i . G_i, in a fixed order; stores delta.
//   bwd dk dv dv_j = sum_i P_ij dO_i, Gk_j = sum_i dS_ij q^_i, dk_j from Gk_j as dq; d_bias and the padded keys'
//             (dk, dv) as V1.
// Every sum has a fixed order: deterministic. Limits as V1: N = wh * ww <= 256, head_dim <= 128.
#pragma once

#include "window_attention.cuh"

namespace vitkernels {
namespace cuda {

namespace wa2_detail {

using wa_detail::exp_acc;
using wa_detail::kSlice;
using wa_detail::kSliceStride;
using wa_detail::load_codes;
using wa_detail::load_qkv_tile;
using wa_detail::load_slice;
using wa_detail::load_table_column;
using wa_detail::load_window_tokens;
using wa_detail::log_acc;
using wa_detail::mask_value;
using wa_detail::max_acc;
using wa_detail::row_sum;
using wa_detail::Tile;

template <typename A> __device__ __forceinline__ A normalize_eps() { return A(1e-12); }  // F.normalize
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }

// |x| of a row held as G slices (x: this thread's slice), the same bits in all G threads.
template <int G, typename A>
__device__ __forceinline__ A row_norm(const A (&x)[kSlice]) {
  A ss = A(0);
#pragma unroll
  for (int d = 0; d < kSlice; ++d) ss += x[d] * x[d];
  return sqrt_acc(row_sum<G>(ss));
}

// x /= max(|x|, eps) in place (F.normalize: a division); returns |x|.
template <int G, typename A>
__device__ __forceinline__ A normalize_slice(A (&x)[kSlice]) {
  const A norm = row_norm<G>(x);
  const A den = max_acc(norm, normalize_eps<A>());
#pragma unroll
  for (int d = 0; d < kSlice; ++d) x[d] = x[d] / den;
  return norm;
}

// F.normalize's backward for one row, in place over g (this thread's slice of G = dx^ / tau): dx = tau (g - x^ (x^ .
// g)) / |x| where |x| >= eps, tau g / eps otherwise. Returns x^ . g (all G threads).
template <int G, typename A>
__device__ __forceinline__ A normalize_backward_slice(const A (&x_hat)[kSlice], A norm, A tau, A (&g)[kSlice]) {
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

// Rows of a staged tile (TILE rows of G slices, row stride G * 33) divided by max(|row|, eps); zero rows stay zero.
template <int G, int TILE, typename A>
__device__ __forceinline__ void normalize_tile(A* tile) {
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
}

// Sum of v over the block's threads in a fixed order (thread order), returned to thread 0.
template <typename A>
__device__ __forceinline__ A block_sum_ordered(A v, A* stage) {
  stage[threadIdx.x] = v;
  __syncthreads();
  A sum = A(0);
  if (threadIdx.x == 0)
    for (int t = 0; t < static_cast<int>(blockDim.x); ++t) sum += stage[t];
  return sum;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: grid (windows, nH, chunks), thread = (query row i, slice).

template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_v2_fwd_kernel(const T* __restrict__ qkv, const T* __restrict__ pad_row,
                                   const typename Acc<T>::type* __restrict__ table,
                                   const typename Acc<T>::type* __restrict__ scale, T* __restrict__ out,
                                   typename Acc<T>::type* __restrict__ lse, const WindowAttentionShape p) {
  using A = typename Acc<T>::type;
  constexpr int KT = Tile<T>::value;
  constexpr int RS = G * kSliceStride;
  __shared__ A k_s[KT * RS];
  __shared__ A v_s[KT * RS];
  __shared__ A tab_s[kWindowAttentionMaxTableRows];
  __shared__ int64_t src_s[kWindowAttentionMaxTokens];
  __shared__ int code_s[kWindowAttentionMaxTokens];
  __shared__ signed char region_s[kWindowAttentionMaxTokens];

  const int64_t w = blockIdx.x;
  const int h = blockIdx.y;
  const int slice = threadIdx.x % G;
  const int i = blockIdx.z * (blockDim.x / G) + threadIdx.x / G;
  const A tau = scale[h];
  load_window_tokens(p, w, src_s, region_s);
  load_codes(p, code_s);
  load_table_column(p, table, h, tab_s);
  __syncthreads();

  // Rows past N compute on row N - 1's data (every thread takes part in the shuffles) and store nothing.
  const bool row = i < p.N;
  const int ic = row ? i : p.N - 1;
  const int64_t src_i = src_s[ic];
  const int code_i = code_s[ic] + p.rel_offset;
  const int region_i = region_s[ic];
  A q[kSlice], o[kSlice];
  load_slice(p, qkv, pad_row, src_i, h, 0, slice, A(1), q);
  normalize_slice<G>(q);
#pragma unroll
  for (int d = 0; d < kSlice; ++d) o[d] = A(0);

  A m = A(0), l = A(0);
  for (int j0 = 0; j0 < p.N; j0 += KT) {
    __syncthreads();  // the previous tile is consumed
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, src_s, j0, h, 1, A(1), false, k_s);
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, src_s, j0, h, 2, A(1), false, v_s);
    __syncthreads();
    normalize_tile<G, KT>(k_s);
    __syncthreads();
    const int nk = p.N - j0 < KT ? p.N - j0 : KT;
    for (int jj = 0; jj < nk; ++jj) {
      const int j = j0 + jj;
      const A* k = k_s + jj * RS + slice * kSliceStride;
      A dot = A(0);
#pragma unroll
      for (int d = 0; d < kSlice; ++d) dot += q[d] * k[d];
      const A s = row_sum<G>(dot) * tau + tab_s[code_i - code_s[j]] +
                  (region_s[j] != region_i ? mask_value<A>() : A(0));
      const bool first = j == 0;
      const A m_new = first ? s : max_acc(m, s);
      const A alpha = first ? A(0) : exp_acc(m - m_new);
      const A e = exp_acc(s - m_new);
      const A* v = v_s + jj * RS + slice * kSliceStride;
      l = l * alpha + e;
#pragma unroll
      for (int d = 0; d < kSlice; ++d) o[d] = o[d] * alpha + e * v[d];
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

// ---------------------------------------------------------------------------------------------------------------
// Backward (a), dq and d tau: grid (windows, nH, chunks), thread = (query row i, slice). Writes the q part of
// grad_qkv for real tokens, delta_i = dO_i . O_i (0 for padded rows) for kernel (b), and this block's d tau share
// into d_scale[(w * nH + h) * chunks + chunk].

template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_v2_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                      const T* __restrict__ pad_row, const typename Acc<T>::type* __restrict__ table,
                                      const typename Acc<T>::type* __restrict__ scale, const T* __restrict__ out,
                                      const typename Acc<T>::type* __restrict__ lse,
                                      typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                      typename Acc<T>::type* __restrict__ d_scale, const WindowAttentionShape p) {
  using A = typename Acc<T>::type;
  constexpr int KT = Tile<T>::value;
  constexpr int RS = G * kSliceStride;
  __shared__ A k_s[KT * RS];
  __shared__ A v_s[KT * RS];
  __shared__ A tab_s[kWindowAttentionMaxTableRows];
  __shared__ A stage_s[kWindowAttentionMaxThreads];
  __shared__ int64_t src_s[kWindowAttentionMaxTokens];
  __shared__ int code_s[kWindowAttentionMaxTokens];
  __shared__ signed char region_s[kWindowAttentionMaxTokens];

  const int64_t w = blockIdx.x;
  const int h = blockIdx.y;
  const int slice = threadIdx.x % G;
  const int i = blockIdx.z * (blockDim.x / G) + threadIdx.x / G;
  const A tau = scale[h];
  load_window_tokens(p, w, src_s, region_s);
  load_codes(p, code_s);
  load_table_column(p, table, h, tab_s);
  __syncthreads();

  // Only real query rows have a gradient (a padded row was cropped: dO = 0, dS = 0); the others compute on their
  // (or row N - 1's) data for the shuffles and store nothing.
  const int ic = i < p.N ? i : p.N - 1;
  const int64_t src_i = src_s[ic];
  const bool row = i < p.N && src_i >= 0;
  const int code_i = code_s[ic] + p.rel_offset;
  const int region_i = region_s[ic];
  const int64_t head = static_cast<int64_t>(h) * p.hd;
  A q[kSlice], dout[kSlice], g[kSlice];
  load_slice(p, qkv, pad_row, src_i, h, 0, slice, A(1), q);
  const A q_norm = normalize_slice<G>(q);
  A delta_i = A(0), lse_i = A(0);
#pragma unroll
  for (int d = 0; d < kSlice; ++d) {
    const int dim = slice * kSlice + d;
    dout[d] = A(0);
    g[d] = A(0);
    if (row && dim < p.hd) {
      dout[d] = to_acc(grad_out[src_i * p.C + head + dim]);
      delta_i += dout[d] * to_acc(out[src_i * p.C + head + dim]);
    }
  }
  delta_i = row_sum<G>(delta_i);
  if (row) lse_i = lse[(w * p.nH + h) * p.N + i];
  if (i < p.N && slice == 0) delta[(w * p.nH + h) * p.N + i] = delta_i;

  for (int j0 = 0; j0 < p.N; j0 += KT) {
    __syncthreads();
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, src_s, j0, h, 1, A(1), false, k_s);
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, src_s, j0, h, 2, A(1), false, v_s);
    __syncthreads();
    normalize_tile<G, KT>(k_s);
    __syncthreads();
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
      s = row_sum<G>(s) * tau + tab_s[code_i - code_s[j]] + (region_s[j] != region_i ? mask_value<A>() : A(0));
      dp = row_sum<G>(dp);  // every thread takes part in the shuffles
      const A ds = row ? exp_acc(s - lse_i) * (dp - delta_i) : A(0);
#pragma unroll
      for (int d = 0; d < kSlice; ++d) g[d] += ds * k[d];
    }
  }

  const A qg = normalize_backward_slice<G>(q, q_norm, tau, g);  // g is now dq
  if (row) {
    T* grow = grad_qkv + src_i * 3 * p.C + head;
#pragma unroll
    for (int d = 0; d < kSlice; ++d) {
      const int dim = slice * kSlice + d;
      if (dim < p.hd) grow[dim] = from_acc<T>(g[d]);
    }
  }
  __syncthreads();
  const A total = block_sum_ordered(row && slice == 0 ? qg : A(0), stage_s);
  if (threadIdx.x == 0) d_scale[(w * p.nH + h) * gridDim.z + blockIdx.z] = total;
}

// ---------------------------------------------------------------------------------------------------------------
// Backward (b), dk, dv, d_bias: grid (groups, nH, chunks), thread = (key row j, slice), as V1's kernel (b).
//   d_bias: (groups, nH, N, N), zero on entry; key row j's slice-0 thread adds dS_ij of every window into column j.
//   d_pad:  (groups * chunks, nH, 2, hd), written: this block's sum over its windows and padded key rows of (dk, dv).

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
  constexpr int QT = Tile<T>::value;
  constexpr int RS = G * kSliceStride;
  constexpr int HDP = G * kSlice;
  static_assert((kWindowAttentionMaxThreads / 32) * HDP <= QT * RS, "staging does not fit the query tiles");
  __shared__ A q_s[QT * RS];   // q^ of real query rows, 0 for padded ones
  __shared__ A do_s[QT * RS];  // dO of real query rows, 0 for padded ones
  __shared__ A lse_s[QT];
  __shared__ A delta_s[QT];
  __shared__ A tab_s[kWindowAttentionMaxTableRows];
  __shared__ A pad_s[2 * HDP];
  __shared__ int64_t src_s[kWindowAttentionMaxTokens];
  __shared__ int code_s[kWindowAttentionMaxTokens];
  __shared__ signed char region_s[kWindowAttentionMaxTokens];

  const int64_t group = blockIdx.x;
  const int h = blockIdx.y;
  const int slice = threadIdx.x % G;
  const int j = blockIdx.z * (blockDim.x / G) + threadIdx.x / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t head = static_cast<int64_t>(h) * p.hd;
  const int64_t w_begin = group * windows_per_group;
  const int64_t w_end = w_begin + windows_per_group < p.windows ? w_begin + windows_per_group : p.windows;
  const A tau = scale[h];

  load_codes(p, code_s);
  load_table_column(p, table, h, tab_s);
  for (int e = threadIdx.x; e < 2 * HDP; e += blockDim.x) pad_s[e] = A(0);

  const bool key = j < p.N;
  const int jc = key ? j : p.N - 1;
  A* bias_col = d_bias + (group * p.nH + h) * p.N * p.N + jc;
  for (int64_t w = w_begin; w < w_end; ++w) {
    __syncthreads();
    load_window_tokens(p, w, src_s, region_s);
    __syncthreads();

    const int64_t src_j = src_s[jc];
    const int code_j = code_s[jc] - p.rel_offset;
    const int region_j = region_s[jc];
    A k[kSlice], v[kSlice], gk[kSlice], dv[kSlice];
    load_slice(p, qkv, pad_row, src_j, h, 1, slice, A(1), k);
    load_slice(p, qkv, pad_row, src_j, h, 2, slice, A(1), v);
    const A k_norm = normalize_slice<G>(k);
#pragma unroll
    for (int d = 0; d < kSlice; ++d) { gk[d] = A(0); dv[d] = A(0); }

    const int64_t lse_base = (w * p.nH + h) * p.N;
    for (int i0 = 0; i0 < p.N; i0 += QT) {
      __syncthreads();
      load_qkv_tile<T, G, QT>(p, qkv, pad_row, src_s, i0, h, 0, A(1), true, q_s);
      for (int e = threadIdx.x; e < QT * HDP; e += blockDim.x) {
        const int ii = e / HDP, dim = e - ii * HDP;
        const int i = i0 + ii;
        A val = A(0);
        if (i < p.N && dim < p.hd && src_s[i] >= 0) val = to_acc(grad_out[src_s[i] * p.C + head + dim]);
        do_s[ii * RS + (dim / kSlice) * kSliceStride + dim % kSlice] = val;
      }
      for (int ii = threadIdx.x; ii < QT; ii += blockDim.x) {
        const int i = i0 + ii;
        const bool real = i < p.N && src_s[i] >= 0;
        lse_s[ii] = real ? lse[lse_base + i] : A(0);
        delta_s[ii] = real ? delta[lse_base + i] : A(0);
      }
      __syncthreads();
      normalize_tile<G, QT>(q_s);
      __syncthreads();
      const int nq = p.N - i0 < QT ? p.N - i0 : QT;
      for (int ii = 0; ii < nq; ++ii) {
        const int i = i0 + ii;
        if (src_s[i] < 0) continue;  // a padded query row (the same for the whole block): P dO = 0, dS = 0
        const A* qi = q_s + ii * RS + slice * kSliceStride;
        const A* doi = do_s + ii * RS + slice * kSliceStride;
        A s = A(0), dp = A(0);
#pragma unroll
        for (int d = 0; d < kSlice; ++d) {
          s += k[d] * qi[d];
          dp += v[d] * doi[d];
        }
        s = row_sum<G>(s) * tau + tab_s[code_s[i] - code_j] + (region_s[i] != region_j ? mask_value<A>() : A(0));
        const A pr = exp_acc(s - lse_s[ii]);
        const A ds = pr * (row_sum<G>(dp) - delta_s[ii]);
#pragma unroll
        for (int d = 0; d < kSlice; ++d) {
          dv[d] += pr * doi[d];
          gk[d] += ds * qi[d];
        }
        if (key && slice == 0) bias_col[static_cast<int64_t>(i) * p.N] += ds;
      }
    }
    normalize_backward_slice<G>(k, k_norm, tau, gk);  // gk is now dk

    if (key && src_j >= 0) {
      T* grow = grad_qkv + src_j * 3 * p.C + head;
#pragma unroll
      for (int d = 0; d < kSlice; ++d) {
        const int dim = slice * kSlice + d;
        if (dim < p.hd) {
          grow[p.C + dim] = from_acc<T>(gk[d]);
          grow[2 * p.C + dim] = from_acc<T>(dv[d]);
        }
      }
    }

    // Padded key rows are the qkv bias: their (dk, dv) go to its k and v parts, reduced in a fixed order as V1.
    const bool pad_key = key && src_j < 0;
    if (__syncthreads_or(pad_key)) {
#pragma unroll
      for (int d = 0; d < kSlice; ++d) {
        A a = pad_key ? gk[d] : A(0);
        A b = pad_key ? dv[d] : A(0);
#pragma unroll
        for (int off = 16; off >= G; off >>= 1) {
          a += __shfl_xor_sync(0xffffffffu, a, off);
          b += __shfl_xor_sync(0xffffffffu, b, off);
        }
        if (lane < G) {
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

}  // namespace wa2_detail

// out (B, H, W, C) and lse (windows, nH, N) from qkv (B, H, W, 3C); pad_row (3C); table (table_rows, nH) and scale
// (nH) in the compute type (float, double for double).
template <typename T>
cudaError_t launch_window_attention_v2_fwd(const T* qkv, const T* pad_row, const typename Acc<T>::type* table,
                                           const typename Acc<T>::type* scale, T* out, typename Acc<T>::type* lse,
                                           const WindowAttentionShape& p, cudaStream_t stream) {
  if (!window_attention_supported(p)) return cudaErrorInvalidValue;
  const WindowAttentionBlocks b = window_attention_blocks(p);
  const dim3 grid(static_cast<unsigned int>(p.windows), static_cast<unsigned int>(p.nH),
                  static_cast<unsigned int>(b.chunks));
  return wa_detail::dispatch_slices(b.slices, [&](auto tag) {
    constexpr int G = decltype(tag)::value;
    wa2_detail::window_attention_v2_fwd_kernel<T, G><<<grid, b.threads, 0, stream>>>(qkv, pad_row, table, scale, out,
                                                                                     lse, p);
    return cudaGetLastError();
  });
}

// Backward: grad_qkv (B, H, W, 3C), every real token's row written. Scratch from the caller, in the compute type:
//   delta (windows, nH, N); d_scale (windows, nH, chunks) with chunks = window_attention_blocks(p).chunks;
//   d_bias (groups, nH, N, N), zero-filled; d_pad (window_attention_pad_partials, nH, 2, hd), with groups =
//   window_attention_groups(windows, windows_per_group). The caller sums d_scale over windows and chunks, d_bias and
//   d_pad over their first dimension (the table gradient: launch_window_attention_bias_grad).
template <typename T>
cudaError_t launch_window_attention_v2_bwd(const T* grad_out, const T* qkv, const T* pad_row,
                                           const typename Acc<T>::type* table, const typename Acc<T>::type* scale,
                                           const T* out, const typename Acc<T>::type* lse,
                                           typename Acc<T>::type* delta, T* grad_qkv,
                                           typename Acc<T>::type* d_scale, typename Acc<T>::type* d_bias,
                                           typename Acc<T>::type* d_pad, const WindowAttentionShape& p,
                                           int64_t windows_per_group, cudaStream_t stream) {
  if (!window_attention_supported(p) || windows_per_group < 1) return cudaErrorInvalidValue;
  const WindowAttentionBlocks b = window_attention_blocks(p);
  const int64_t groups = window_attention_groups(p.windows, windows_per_group);
  return wa_detail::dispatch_slices(b.slices, [&](auto tag) {
    constexpr int G = decltype(tag)::value;
    const dim3 grid_dq(static_cast<unsigned int>(p.windows), static_cast<unsigned int>(p.nH),
                       static_cast<unsigned int>(b.chunks));
    wa2_detail::window_attention_v2_bwd_dq_kernel<T, G><<<grid_dq, b.threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, scale, out, lse, delta, grad_qkv, d_scale, p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const dim3 grid_dkdv(static_cast<unsigned int>(groups), static_cast<unsigned int>(p.nH),
                         static_cast<unsigned int>(b.chunks));
    wa2_detail::window_attention_v2_bwd_dkdv_kernel<T, G><<<grid_dkdv, b.threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, scale, lse, delta, grad_qkv, d_bias, d_pad, p, windows_per_group);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vitkernels
