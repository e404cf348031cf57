// CUDA kernels for Swin (shifted) window attention, fused from the qkv Linear's output in original NHWC token order
// to the attention output in original order (semantics: vitkernels/reference/window_attention.py; the CPU kernels
// of csrc/cpu/window_attention_kernel.h compute the same thing). Runtime-only: compiled by `nvcc -c` in CI without
// torch; the torch binding is csrc/cuda/window_attention.cu.
//
// A correct, plain fallback (the Triton kernels are the tensor-core path): scalar fp32 math (fp64 for fp64).
// A token row (a query row in the forward and dq kernels, a key row in the dk/dv kernel) belongs to G = 1, 2 or 4
// adjacent threads (head_dim <= 32, 64, 128), each holding a 32-wide slice of the head dimension in registers (zero
// past head_dim); dot products are summed over the G slices with butterfly shuffles, so all G threads of a row get
// bit-identical values. A block holds up to 256 / G rows: one block per (window, head) and, when N * G > 256, per
// chunk of rows (gridDim.z). With 32-wide slices no kernel needs more than 4 x 32 accumulators per thread.
//   forward   online softmax over tiles of TILE key / value rows staged in shared memory as fp32, in steps of SUB keys:
//               S_ij = (scale q_i) . k_j + table[rel(i, j), h] + (-100 if the tokens' regions differ)
//             lse_i = m_i + log(l_i) for every row (padded query rows too); outputs of real tokens only.
//   bwd dq    P_ij = exp(S_ij - lse_i), dP_ij = dO_i . v_j, delta_i = dO_i . O_i, dS_ij = P_ij (dP_ij - delta_i),
//             dq_i = scale sum_j dS_ij k_j; also stores delta for the dk/dv kernel.
//   bwd dk dv block per (group of windows, head, chunk of key rows): over the group's windows and tiles of TILE
//             query rows in shared memory, dk_j = sum_i dS_ij (scale q_i), dv_j = sum_i P_ij dO_i. Padded query rows
//             (dO = 0, delta = 0) contribute exactly zero and are skipped. d_bias[i][j] is summed over the group's
//             windows in a (groups, nH, N, N) buffer whose column j only key row j's first thread touches (no
//             atomics); padded key rows' (dk, dv) (the k, v parts of the qkv bias) are reduced in a fixed order into
//             a (groups * chunks, nH, 2, hd) buffer.
// Every sum has a fixed order: results are deterministic. Token addressing is WindowGeometry::window_token (shift
// and padding in the load and store addresses); padded tokens read `pad_row` (the qkv bias or zeros); offsets are
// int64. Limits: N = wh * ww <= 256, head_dim <= 128.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "masking.cuh"  // Acc, to_acc, from_acc, grid_for
#include "vitkernels/window_geometry.h"

namespace vitkernels {
namespace cuda {

constexpr int kWindowAttentionMaxTokens = 256;      // N = wh * ww
constexpr int kWindowAttentionMaxHeadDim = 128;
constexpr int kWindowAttentionMaxTableRows = 1024;  // (2 wh - 1)(2 ww - 1) < 4 wh ww <= 1024
constexpr int kWindowAttentionMaxThreads = 256;     // per block

// What every kernel needs to know about the problem.
struct WindowAttentionShape {
  WindowGeometry g;
  int64_t C;        // nH * hd: channels of the output; qkv rows have 3C
  int64_t windows;  // B * nWh * nWw
  int N, nH, hd;
  int table_rows;   // (2 wh - 1)(2 ww - 1)
  int code_stride;  // 2 ww - 1: token t's code is (t / ww) * code_stride + t % ww, and
  int rel_offset;   // relative_index(i, j) = code_i - code_j + rel_offset (= (wh - 1) * code_stride + ww - 1)
};

inline WindowAttentionShape make_window_attention_shape(const WindowGeometry& g, int64_t num_heads,
                                                        int64_t head_dim) {
  WindowAttentionShape p;
  p.g = g;
  p.C = num_heads * head_dim;
  p.windows = g.B * g.windows_per_image();
  p.N = static_cast<int>(g.tokens_per_window());
  p.nH = static_cast<int>(num_heads);
  p.hd = static_cast<int>(head_dim);
  p.table_rows = static_cast<int>((2 * g.wh - 1) * (2 * g.ww - 1));
  p.code_stride = static_cast<int>(2 * g.ww - 1);
  p.rel_offset = static_cast<int>((g.wh - 1) * (2 * g.ww - 1) + (g.ww - 1));
  return p;
}

// How the rows of a window map onto blocks: G threads per row, rows_per_block rows per block, `chunks` blocks per
// window (forward, dq) or per group of windows (dk, dv).
struct WindowAttentionBlocks {
  int slices, threads, rows_per_block, chunks;
};

inline WindowAttentionBlocks window_attention_blocks(const WindowAttentionShape& p) {
  WindowAttentionBlocks b;
  b.slices = p.hd <= 32 ? 1 : (p.hd <= 64 ? 2 : 4);
  const int max_rows = kWindowAttentionMaxThreads / b.slices;
  const int rows = p.N < max_rows ? p.N : max_rows;
  b.threads = (rows * b.slices + 31) / 32 * 32;
  b.rows_per_block = b.threads / b.slices;
  b.chunks = (p.N + b.rows_per_block - 1) / b.rows_per_block;
  return b;
}

inline bool window_attention_supported(const WindowAttentionShape& p) {
  return p.N >= 1 && p.N <= kWindowAttentionMaxTokens && p.hd >= 1 && p.hd <= kWindowAttentionMaxHeadDim &&
         p.table_rows <= kWindowAttentionMaxTableRows && p.nH >= 1 && p.nH <= 65535 && p.windows >= 1 &&
         p.windows <= 0x7fffffff;
}

// Windows per group of the dk / dv kernel, for about `target_blocks` blocks in all (a few per multiprocessor); the
// number of groups is ceil(windows / that), every group has at least one window.
inline int64_t window_attention_windows_per_group(int64_t windows, int64_t num_heads, int64_t target_blocks) {
  if (windows <= 0) return 1;
  const int64_t heads = num_heads > 0 ? num_heads : 1;
  int64_t groups = (target_blocks + heads - 1) / heads;
  if (groups < 1) groups = 1;
  if (groups > windows) groups = windows;
  return (windows + groups - 1) / groups;
}

inline int64_t window_attention_groups(int64_t windows, int64_t windows_per_group) {
  return (windows + windows_per_group - 1) / windows_per_group;
}

namespace wa_detail {

constexpr int kSlice = 32;        // head-dim elements per thread
constexpr int kSliceStride = 33;  // in shared tiles: slices of one row start in different banks
constexpr int kSub = 8;           // forward: keys per online-softmax step

// Rows staged in shared memory per step: keys / values (forward, dq) or queries / output gradients (dk, dv).
template <typename T> struct Tile { static constexpr int value = 32; };
template <> struct Tile<double> { static constexpr int value = 16; };  // the same 48 KB static budget

template <typename A> __device__ __forceinline__ A mask_value() { return A(-100); }  // timm / official Swin

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
template <typename A> __device__ __forceinline__ A max_acc(A a, A b) { return a > b ? a : b; }

// Sum over the G adjacent threads of a row (all threads of the warp must call it). The butterfly gives every
// thread of the row the same bits.
template <int G, typename A> __device__ __forceinline__ A row_sum(A x) {
#pragma unroll
  for (int off = 1; off < G; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Window w's tokens, t < N: source token (-1 for padding) and mask region.
__device__ __forceinline__ void load_window_tokens(const WindowAttentionShape& p, int64_t w, int64_t* src_s,
                                                   signed char* region_s) {
  for (int t = threadIdx.x; t < p.N; t += blockDim.x) {
    int region;
    src_s[t] = p.g.window_token(w, t, &region);
    region_s[t] = static_cast<signed char>(region);
  }
}

// Relative-position codes of the N tokens (the same for every window).
__device__ __forceinline__ void load_codes(const WindowAttentionShape& p, int* code_s) {
  const int ww = static_cast<int>(p.g.ww);
  for (int t = threadIdx.x; t < p.N; t += blockDim.x) code_s[t] = (t / ww) * p.code_stride + t % ww;
}

// Head h's column of the (table_rows, nH) relative position bias table (already in the compute type).
template <typename A>
__device__ __forceinline__ void load_table_column(const WindowAttentionShape& p, const A* __restrict__ table, int h,
                                                  A* tab_s) {
  for (int r = threadIdx.x; r < p.table_rows; r += blockDim.x) tab_s[r] = table[static_cast<int64_t>(r) * p.nH + h];
}

// Rows [r0, r0 + TILE) of the window, part `part` (0 q, 1 k, 2 v) of head h, times `mul`, into a tile of TILE rows
// of G slices (row stride G * 33, slice stride 33); zero past N, past head_dim and, if skip_pad, for padded tokens.
template <typename T, int G, int TILE>
__device__ __forceinline__ void load_qkv_tile(const WindowAttentionShape& p, const T* __restrict__ qkv,
                                              const T* __restrict__ pad_row, const int64_t* src_s, int r0, int h,
                                              int part, typename Acc<T>::type mul, bool skip_pad,
                                              typename Acc<T>::type* tile) {
  using A = typename Acc<T>::type;
  constexpr int HDP = G * kSlice;
  const int64_t col = part * p.C + static_cast<int64_t>(h) * p.hd;
  for (int e = threadIdx.x; e < TILE * HDP; e += blockDim.x) {
    const int rr = e / HDP, dim = e - rr * HDP;
    const int r = r0 + rr;
    A val = A(0);
    if (r < p.N && dim < p.hd) {
      const int64_t src = src_s[r];
      if (src >= 0) val = to_acc(qkv[src * 3 * p.C + col + dim]) * mul;
      else if (!skip_pad) val = to_acc(pad_row[col + dim]) * mul;
    }
    tile[rr * (G * kSliceStride) + (dim / kSlice) * kSliceStride + dim % kSlice] = val;
  }
}

// This thread's slice of head h's part `part` of token row `src` (pad_row if src < 0), times `mul`.
template <typename T>
__device__ __forceinline__ void load_slice(const WindowAttentionShape& p, const T* __restrict__ qkv,
                                           const T* __restrict__ pad_row, int64_t src, int h, int part, int slice,
                                           typename Acc<T>::type mul, typename Acc<T>::type (&x)[kSlice]) {
  using A = typename Acc<T>::type;
  const T* row = (src >= 0 ? qkv + src * 3 * p.C : pad_row) + part * p.C + static_cast<int64_t>(h) * p.hd;
#pragma unroll
  for (int d = 0; d < kSlice; ++d) {
    const int dim = slice * kSlice + d;
    x[d] = dim < p.hd ? to_acc(row[dim]) * mul : A(0);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: grid (windows, nH, chunks), thread = (query row i, slice).

template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_fwd_kernel(const T* __restrict__ qkv, const T* __restrict__ pad_row,
                                const typename Acc<T>::type* __restrict__ table, T* __restrict__ out,
                                typename Acc<T>::type* __restrict__ lse, const WindowAttentionShape p,
                                const typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  constexpr int KT = Tile<T>::value;
  constexpr int RS = G * kSliceStride;  // tile row stride
  static_assert(KT % kSub == 0, "key tiles are whole softmax steps");
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
  load_slice(p, qkv, pad_row, src_i, h, 0, slice, scale, q);
#pragma unroll
  for (int d = 0; d < kSlice; ++d) o[d] = A(0);

  A m = A(0), l = A(0);  // running max and sum of exp(S - m); m is set by the first step
  for (int j0 = 0; j0 < p.N; j0 += KT) {
    __syncthreads();  // the previous tile is consumed
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, src_s, j0, h, 1, A(1), false, k_s);
    load_qkv_tile<T, G, KT>(p, qkv, pad_row, src_s, j0, h, 2, A(1), false, v_s);
    __syncthreads();
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
        dot = row_sum<G>(dot);
        s[jj] = A(0);
        if (js + jj < nk) {
          const int j = j0 + js + jj;
          dot = dot + tab_s[code_i - code_s[j]];
          dot = dot + (region_s[j] != region_i ? mask_value<A>() : A(0));
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

// ---------------------------------------------------------------------------------------------------------------
// Backward (a), dq: grid (windows, nH, chunks), thread = (query row i, slice). Writes the q part of grad_qkv for
// real tokens and delta_i = dO_i . O_i (0 for padded rows) for kernel (b).

template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                   const T* __restrict__ pad_row, const typename Acc<T>::type* __restrict__ table,
                                   const T* __restrict__ out, const typename Acc<T>::type* __restrict__ lse,
                                   typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                   const WindowAttentionShape p, const typename Acc<T>::type scale) {
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
  load_window_tokens(p, w, src_s, region_s);
  load_codes(p, code_s);
  load_table_column(p, table, h, tab_s);
  __syncthreads();

  // Only real query rows have a gradient: a padded row was cropped from the output (dO = 0, so dS = 0). The other
  // threads compute on zeros (every thread takes part in the shuffles) and store nothing.
  const int ic = i < p.N ? i : p.N - 1;
  const int64_t src_i = src_s[ic];
  const bool row = i < p.N && src_i >= 0;
  const int code_i = code_s[ic] + p.rel_offset;
  const int region_i = region_s[ic];
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
      q[d] = to_acc(qkv[src_i * 3 * p.C + head + dim]) * scale;
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
      s = row_sum<G>(s);
      dp = row_sum<G>(dp);
      s = s + tab_s[code_i - code_s[j]];
      s = s + (region_s[j] != region_i ? mask_value<A>() : A(0));
      const A ds = exp_acc(s - lse_i) * (dp - delta_i);
#pragma unroll
      for (int d = 0; d < kSlice; ++d) dq[d] += ds * k[d];
    }
  }

  if (row) {
    T* grow = grad_qkv + src_i * 3 * p.C + head;
#pragma unroll
    for (int d = 0; d < kSlice; ++d) {
      const int dim = slice * kSlice + d;
      if (dim < p.hd) grow[dim] = from_acc<T>(dq[d] * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward (b), dk, dv, d_bias: grid (groups, nH, chunks), thread = (key row j, slice); the group's windows are
// [group * windows_per_group, min(... + windows_per_group, windows)).
//   d_bias: (groups, nH, N, N), zero on entry; key row j's slice-0 thread adds dS_ij of every window into column j.
//   d_pad:  (groups * chunks, nH, 2, hd), written: this block's sum over its windows and padded key rows of (dk, dv).

template <typename T, int G>
__global__ void __launch_bounds__(kWindowAttentionMaxThreads)
    window_attention_bwd_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ qkv,
                                     const T* __restrict__ pad_row, const typename Acc<T>::type* __restrict__ table,
                                     const typename Acc<T>::type* __restrict__ lse,
                                     const typename Acc<T>::type* __restrict__ delta, T* __restrict__ grad_qkv,
                                     typename Acc<T>::type* __restrict__ d_bias,
                                     typename Acc<T>::type* __restrict__ d_pad, const WindowAttentionShape p,
                                     const typename Acc<T>::type scale, const int64_t windows_per_group) {
  using A = typename Acc<T>::type;
  constexpr int QT = Tile<T>::value;
  constexpr int RS = G * kSliceStride;
  constexpr int HDP = G * kSlice;
  // The padded-key reduction stages one HDP-row per warp in q_s and in do_s.
  static_assert((kWindowAttentionMaxThreads / 32) * HDP <= QT * RS, "staging does not fit the query tiles");
  __shared__ A q_s[QT * RS];   // scale * q of real query rows, 0 for padded ones
  __shared__ A do_s[QT * RS];  // dO of real query rows, 0 for padded ones
  __shared__ A lse_s[QT];
  __shared__ A delta_s[QT];
  __shared__ A tab_s[kWindowAttentionMaxTableRows];
  __shared__ A pad_s[2 * HDP];  // this block's sums of the padded key rows' dk (first HDP) and dv
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

  load_codes(p, code_s);
  load_table_column(p, table, h, tab_s);
  for (int e = threadIdx.x; e < 2 * HDP; e += blockDim.x) pad_s[e] = A(0);

  // Rows past N compute on row N - 1's data (every thread takes part in the shuffles) and store nothing.
  const bool key = j < p.N;
  const int jc = key ? j : p.N - 1;
  A* bias_col = d_bias + (group * p.nH + h) * p.N * p.N + jc;  // + i * N: dS_ij summed over the group's windows
  for (int64_t w = w_begin; w < w_end; ++w) {
    __syncthreads();  // the previous window's tokens, tiles and staging are consumed; codes, table are loaded
    load_window_tokens(p, w, src_s, region_s);
    __syncthreads();

    const int64_t src_j = src_s[jc];
    const int code_j = code_s[jc] - p.rel_offset;
    const int region_j = region_s[jc];
    A k[kSlice], v[kSlice], dk[kSlice], dv[kSlice];
    load_slice(p, qkv, pad_row, src_j, h, 1, slice, A(1), k);
    load_slice(p, qkv, pad_row, src_j, h, 2, slice, A(1), v);
#pragma unroll
    for (int d = 0; d < kSlice; ++d) { dk[d] = A(0); dv[d] = A(0); }

    const int64_t lse_base = (w * p.nH + h) * p.N;
    for (int i0 = 0; i0 < p.N; i0 += QT) {
      __syncthreads();
      load_qkv_tile<T, G, QT>(p, qkv, pad_row, src_s, i0, h, 0, scale, true, q_s);
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
      const int nq = p.N - i0 < QT ? p.N - i0 : QT;
      for (int ii = 0; ii < nq; ++ii) {
        const int i = i0 + ii;
        if (src_s[i] < 0) continue;  // a padded query row (the same for the whole block): P dO = 0 and dS = 0
        const A* qi = q_s + ii * RS + slice * kSliceStride;
        const A* doi = do_s + ii * RS + slice * kSliceStride;
        A s = A(0), dp = A(0);
#pragma unroll
        for (int d = 0; d < kSlice; ++d) {
          s += k[d] * qi[d];
          dp += v[d] * doi[d];
        }
        s = row_sum<G>(s);
        dp = row_sum<G>(dp);
        s = s + tab_s[code_s[i] - code_j];
        s = s + (region_s[i] != region_j ? mask_value<A>() : A(0));
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

// grad_table[r, h] = sum of d_bias[h, i, j] (already summed over windows) over the pairs with relative_index(i, j)
// = r: for each query i at most one key j. One thread per table entry, a fixed order: deterministic. (A template
// only so that the header holds no non-inline definition; used with D = double.)
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

template <int G> struct SlicesTag { static constexpr int value = G; };

// Calls launch(SlicesTag<G>{}) with the G of these blocks.
template <typename Launch>
cudaError_t dispatch_slices(int slices, Launch&& launch) {
  if (slices == 1) return launch(SlicesTag<1>{});
  if (slices == 2) return launch(SlicesTag<2>{});
  return launch(SlicesTag<4>{});
}

}  // namespace wa_detail

// Rows of the d_pad scratch of launch_window_attention_bwd: groups * chunks.
inline int64_t window_attention_pad_partials(const WindowAttentionShape& p, int64_t windows_per_group) {
  return window_attention_groups(p.windows, windows_per_group) * window_attention_blocks(p).chunks;
}

// out (B, H, W, C) and lse (windows, nH, N) from qkv (B, H, W, 3C); pad_row (3C); table (table_rows, nH) in the
// compute type (float, double for double).
template <typename T>
cudaError_t launch_window_attention_fwd(const T* qkv, const T* pad_row, const typename Acc<T>::type* table, T* out,
                                        typename Acc<T>::type* lse, const WindowAttentionShape& p, double scale,
                                        cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (!window_attention_supported(p)) return cudaErrorInvalidValue;
  const WindowAttentionBlocks b = window_attention_blocks(p);
  const dim3 grid(static_cast<unsigned int>(p.windows), static_cast<unsigned int>(p.nH),
                  static_cast<unsigned int>(b.chunks));
  return wa_detail::dispatch_slices(b.slices, [&](auto tag) {
    constexpr int G = decltype(tag)::value;
    wa_detail::window_attention_fwd_kernel<T, G><<<grid, b.threads, 0, stream>>>(qkv, pad_row, table, out, lse, p,
                                                                                 static_cast<A>(scale));
    return cudaGetLastError();
  });
}

// Backward: grad_qkv (B, H, W, 3C), every real token's row written. Scratch from the caller, in the compute type:
//   delta (windows, nH, N); d_bias (groups, nH, N, N), zero-filled; d_pad (window_attention_pad_partials, nH, 2,
//   hd), with groups = window_attention_groups(windows, windows_per_group). The caller sums d_bias and d_pad over
//   their first dimension.
template <typename T>
cudaError_t launch_window_attention_bwd(const T* grad_out, const T* qkv, const T* pad_row,
                                        const typename Acc<T>::type* table, const T* out,
                                        const typename Acc<T>::type* lse, typename Acc<T>::type* delta, T* grad_qkv,
                                        typename Acc<T>::type* d_bias, typename Acc<T>::type* d_pad,
                                        const WindowAttentionShape& p, double scale, int64_t windows_per_group,
                                        cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (!window_attention_supported(p) || windows_per_group < 1) return cudaErrorInvalidValue;
  const WindowAttentionBlocks b = window_attention_blocks(p);
  const int64_t groups = window_attention_groups(p.windows, windows_per_group);
  return wa_detail::dispatch_slices(b.slices, [&](auto tag) {
    constexpr int G = decltype(tag)::value;
    const dim3 grid_dq(static_cast<unsigned int>(p.windows), static_cast<unsigned int>(p.nH),
                       static_cast<unsigned int>(b.chunks));
    wa_detail::window_attention_bwd_dq_kernel<T, G><<<grid_dq, b.threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, out, lse, delta, grad_qkv, p, static_cast<A>(scale));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const dim3 grid_dkdv(static_cast<unsigned int>(groups), static_cast<unsigned int>(p.nH),
                         static_cast<unsigned int>(b.chunks));
    wa_detail::window_attention_bwd_dkdv_kernel<T, G><<<grid_dkdv, b.threads, 0, stream>>>(
        grad_out, qkv, pad_row, table, lse, delta, grad_qkv, d_bias, d_pad, p, static_cast<A>(scale),
        windows_per_group);
    return cudaGetLastError();
  });
}

// grad_table (table_rows, nH) from d_bias (nH, N, N) summed over windows, both double; every entry is written.
inline cudaError_t launch_window_attention_bias_grad(const double* d_bias, double* grad_table, int64_t wh, int64_t ww,
                                                     int64_t num_heads, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = (2 * wh - 1) * (2 * ww - 1) * num_heads;
  if (total <= 0) return cudaSuccess;
  wa_detail::window_attention_bias_grad_kernel<double><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
      d_bias, grad_table, static_cast<int>(wh), static_cast<int>(ww), static_cast<int>(num_heads));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vitkernels
