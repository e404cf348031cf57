// Device helpers shared by the window attention kernels of Swin V1 (window_attention_fwd.cuh,
// window_attention_bwd.cuh), Swin V2 (window_attention_v2_*.cuh) and 3D (window_attention_3d_*.cuh): the per-window
// prologue every kernel runs (source tokens and mask regions of the window, relative-position codes, the head's
// bias-table column, all staged in shared memory, sized by the geometry's WindowLayout), the tile / slice loads of q,
// k, v, the row sums over the G threads of a token row, V1's way of forming scores (DotProductScores; V2's is
// CosineScores in window_attention_v2_prologue.cuh) and the launch grids. Layout and notation: window_attention.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"  // Acc, to_acc
#include "window_attention.cuh"

namespace vitkernels {
namespace cuda {
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
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }
template <typename A> __device__ __forceinline__ A max_acc(A a, A b) { return a > b ? a : b; }

// Sum over the G adjacent threads of a row (all threads of the warp must call it). The butterfly gives every
// thread of the row the same bits.
template <int G, typename A> __device__ __forceinline__ A row_sum(A x) {
#pragma unroll
  for (int off = 1; off < G; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// What every block keeps of its window in shared memory besides its tiles: the window's source tokens (-1 for
// padding) and mask regions, the relative-position codes of its N tokens, and head h's column of the bias table (in
// the compute type) when it fits: always for ALWAYS (2D), else when table_rows <= TABLE (3D: TABLE is what the
// block's other shared arrays leave, WindowSharedOf); a table that does not fit is read in global memory (bias()).
// The forward and dq kernels load it once (load_window); the dk / dv kernel loads the codes and the table once and
// the tokens per window of its group.
template <typename A, int TOKENS, int TABLE, bool ALWAYS>
struct WindowShared {
  A tab[TABLE];
  int64_t src[TOKENS];
  int code[TOKENS];
  signed char region[TOKENS];

  // Whether a table of `rows` rows is staged in tab.
  __device__ __forceinline__ static bool staged(int rows) { return ALWAYS || rows <= TABLE; }
  // Head h's bias of relative index r (0 <= r < table_rows): tab[r] if staged, else column[r * stride] with column =
  // table + h, stride = nH (the (table_rows, nH) table in global memory).
  __device__ __forceinline__ A bias(int r, bool is_staged, const A* __restrict__ column, int stride) const {
    if (ALWAYS || is_staged) return tab[r];
    return column[static_cast<int64_t>(r) * stride];
  }
};

constexpr int kStaticSharedBytes = 48 * 1024;  // __shared__ arrays of one block (tools/compile_gate_cuda.py gates it)

// The WindowShared of a block for Geometry whose other __shared__ arrays take OTHER bytes: the whole table when the
// layout says it always fits, else as many table rows as the rest of the 48 KB holds (less 256 bytes of alignment
// slack), at most the layout's kMaxTableRows.
template <typename A, typename Geometry, int OTHER>
struct WindowSharedOf {
  using L = WindowLayout<Geometry>;
  static constexpr int kTokenBytes = L::kMaxTokens * static_cast<int>(sizeof(int64_t) + sizeof(int) + 1);
  static constexpr int kFree = (kStaticSharedBytes - OTHER - kTokenBytes - 256) / static_cast<int>(sizeof(A));
  static constexpr int kTableRows =
      L::kTableAlwaysShared ? L::kMaxTableRows : (kFree < L::kMaxTableRows ? kFree : L::kMaxTableRows);
  static_assert(kTableRows >= 1, "the token arrays and tiles leave no shared memory for the table");
  using type = WindowShared<A, L::kMaxTokens, kTableRows, L::kTableAlwaysShared>;
};

// Window w's tokens, t < N: source token (-1 for padding) and mask region.
template <typename Shape, typename Win>
__device__ __forceinline__ void load_window_tokens(const Shape& p, int64_t w, Win& win) {
  for (int t = threadIdx.x; t < p.N; t += blockDim.x) {
    int region;
    win.src[t] = p.g.window_token(w, t, &region);
    win.region[t] = static_cast<signed char>(region);
  }
}

// Relative-position codes of the N tokens (the same for every window) and, if it is staged, head h's column of the
// (table_rows, nH) relative position bias table (already in the compute type).
template <typename A, typename Shape, typename Win>
__device__ __forceinline__ void load_codes_and_table(const Shape& p, const A* __restrict__ table, int h, Win& win) {
  for (int t = threadIdx.x; t < p.N; t += blockDim.x)
    win.code[t] = static_cast<int>(p.g.relative_index(t, 0)) - p.rel_offset;
  if (!Win::staged(p.table_rows)) return;
  for (int r = threadIdx.x; r < p.table_rows; r += blockDim.x) win.tab[r] = table[static_cast<int64_t>(r) * p.nH + h];
}

// The prologue of a (window w, head h) block: all of the above, then a barrier.
template <typename A, typename Shape, typename Win>
__device__ __forceinline__ void load_window(const Shape& p, const A* __restrict__ table, int64_t w, int h, Win& win) {
  load_window_tokens(p, w, win);
  load_codes_and_table(p, table, h, win);
  __syncthreads();
}

// Rows [r0, r0 + TILE) of the window, part `part` (0 q, 1 k, 2 v) of head h, times `mul`, into a tile of TILE rows
// of G slices (row stride G * 33, slice stride 33); zero past N, past head_dim and, if skip_pad, for padded tokens.
template <typename T, int G, int TILE, typename Shape>
__device__ __forceinline__ void load_qkv_tile(const Shape& p, const T* __restrict__ qkv,
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
template <typename T, typename Shape>
__device__ __forceinline__ void load_slice(const Shape& p, const T* __restrict__ qkv,
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

// How the forward, dq and dk / dv blocks (window_attention_fwd.cuh, window_attention_bwd.cuh) form the scores
// S_ij = f(q_i, k_j) + bias_ij and take their gradients back: a policy object, one per variant, passed by value to
// the block functions (its members compile to nothing where a variant has nothing to do). Rows are loaded (queries
// times query_mul(), keys as they are), then normalize<G> / normalize_tile<G, TILE> may transform them in place;
// logits takes the dot product of the transformed rows.
//   query_mul()                 factor applied to the queries as they are loaded (register slices and staged tiles);
//                               the dq kernel multiplies its gradient by it on the way out
//   normalize<G>(x)             a query / key row held in registers (this thread's slice), in place; returns what
//                               the row's gradient needs later (all G threads of the row must call it)
//   normalize_tile<G, TILE>(t)  the rows of a staged key (forward, dq) or query (dk / dv) tile, after the barrier
//                               that completes its load; ends with a barrier where it does anything
//   logits(dot)                 S_ij minus the bias, from the row's (summed) dot product
//   query_grad<G>(q, state, g)  g = sum_j dS_ij k_j (staged keys) -> gradient of the loaded q_i, in place; returns
//                               the row's share of the variant's other gradients (all G threads must call it)
//   key_grad<G>(k, state, g)    g = sum_i dS_ij q_i (staged queries) -> gradient of the loaded k_j, in place (all G)
// V1: S_ij = (scale q_i) . k_j: queries loaded times scale, nothing else (dq = scale g, dk = g).
template <typename A>
struct DotProductScores {
  A scale;
  __device__ __forceinline__ A query_mul() const { return scale; }
  template <int G> __device__ __forceinline__ A normalize(A (&)[kSlice]) const { return A(0); }
  template <int G, int TILE> __device__ __forceinline__ void normalize_tile(A*) const {}
  __device__ __forceinline__ A logits(A dot) const { return dot; }
  template <int G> __device__ __forceinline__ A query_grad(const A (&)[kSlice], A, A (&)[kSlice]) const { return A(0); }
  template <int G> __device__ __forceinline__ void key_grad(const A (&)[kSlice], A, A (&)[kSlice]) const {}
};

template <int G> struct SlicesTag { static constexpr int value = G; };

// Calls launch(SlicesTag<G>{}) with the G of these blocks.
template <typename Launch>
cudaError_t dispatch_slices(int slices, Launch&& launch) {
  if (slices == 1) return launch(SlicesTag<1>{});
  if (slices == 2) return launch(SlicesTag<2>{});
  return launch(SlicesTag<4>{});
}

// The grid of the forward and dq kernels (x = windows) and of the dk / dv kernel (x = groups of windows): one block
// per (x, head, chunk of rows).
template <typename Shape>
inline dim3 window_attention_grid(int64_t x, const Shape& p, const WindowAttentionBlocks& b) {
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(p.nH), static_cast<unsigned int>(b.chunks));
}

// The launchers' common part. Forward: launch(SlicesTag<G>{}, grid, threads); backward: launch(SlicesTag<G>{},
// grid_dq, grid_dkdv, threads). cudaErrorInvalidValue, without calling launch, for a problem
// window_attention_supported refuses (or windows_per_group < 1).
template <typename Shape, typename Launch>
cudaError_t dispatch_forward(const Shape& p, Launch&& launch) {
  if (!window_attention_supported(p)) return cudaErrorInvalidValue;
  const WindowAttentionBlocks b = window_attention_blocks(p);
  return dispatch_slices(b.slices,
                         [&](auto tag) { return launch(tag, window_attention_grid(p.windows, p, b), b.threads); });
}

template <typename Shape, typename Launch>
cudaError_t dispatch_backward(const Shape& p, int64_t windows_per_group, Launch&& launch) {
  if (!window_attention_supported(p) || windows_per_group < 1) return cudaErrorInvalidValue;
  const WindowAttentionBlocks b = window_attention_blocks(p);
  const int64_t groups = window_attention_groups(p.windows, windows_per_group);
  return dispatch_slices(b.slices, [&](auto tag) {
    return launch(tag, window_attention_grid(p.windows, p, b), window_attention_grid(groups, p, b), b.threads);
  });
}

}  // namespace wa_detail
}  // namespace cuda
}  // namespace vitkernels
