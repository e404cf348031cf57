// CUDA Swin (shifted) window attention: the launch API the torch binding (window_attention.cpp) calls, with the
// problem description and its limits. Fused from the qkv Linear's output in original NHWC token order to the attention
// output in original order (semantics: vitkernels/reference/window_attention.py; the CPU kernels of
// csrc/cpu/window_attention_kernel.h compute the same thing).
//
// Files, split as flash-attention splits kernels, launch templates and instantiations (all runtime-only: no torch):
//   window_attention.cuh           this header: WindowAttentionShape, the block layout, the support check and the
//                                  launchers' declarations (host code only, so the binding compiles no kernels)
//   window_attention_prologue.cuh  device helpers every kernel shares: token / code / table loads, tiles, row sums
//   window_attention_fwd.cuh       forward kernel + launch_window_attention_fwd
//   window_attention_bwd.cuh       dq, dk/dv and bias-gradient kernels + their launchers
//   window_attention_{fwd,bwd}_kernels.cu  explicit instantiations for float, double, half and bfloat16 (compiled in
//                                  parallel with the binding, without torch's headers)
// The kernels' work is written once, as block functions generic over how scores are formed (DotProductScores here;
// Swin V2's cosine attention, window_attention_v2*.cuh, runs the same blocks with CosineScores) and over the window
// geometry (WindowGeometry here; the 3D op, window_attention_3d*.cuh, runs the same blocks with WindowGeometry3D:
// WindowLayout, WindowAttentionShapeT).
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
// Every sum has a fixed order: results are deterministic. Token addressing is the geometry's window_token (shift
// and padding in the load and store addresses); padded tokens read `pad_row` (the qkv bias or zeros); offsets are
// int64. The bias index of a pair is the difference of the two tokens' staged relative-position codes. Limits (2D):
// N = wh * ww <= 256, head_dim <= 128; the table always fits in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"  // Acc
#include "vitkernels/window_geometry.h"

namespace vitkernels {
namespace cuda {

constexpr int kWindowAttentionMaxTokens = 256;      // N = wh * ww (2D windows)
constexpr int kWindowAttentionMaxHeadDim = 128;
constexpr int kWindowAttentionMaxTableRows = 1024;  // (2 wh - 1)(2 ww - 1) < 4 wh ww <= 1024
constexpr int kWindowAttentionMaxThreads = 256;     // per block

// What the kernels need of a window geometry (WindowGeometry: 2D; WindowGeometry3D: window_attention_3d.cuh), read
// by the kernels' shared-memory layout (window_attention_prologue.cuh) and the support check:
//   kMaxTokens          N = tokens per window, the capacity of the per-window token arrays in shared memory
//   kMaxTableRows       relative position bias table rows the kernels accept
//   kTableAlwaysShared  true when head h's column of any accepted table fits the blocks' shared memory (2D: 1024
//                       rows); false when a block stages it only if it fits what its tiles leave of the 48 KB and
//                       otherwise reads the table in global memory (3D)
// A geometry provides window_token(w, t, &region) (source token or -1, mask region < 128), relative_index(i, j), which
// must be code(i) - code(j) + relative_index(0, 0) for per-token codes code(t) = relative_index(t, 0) -
// relative_index(0, 0) (the bias index is then a subtraction of two staged codes), tokens_per_window(),
// windows_per_image() and B.
template <typename Geometry> struct WindowLayout;
template <> struct WindowLayout<WindowGeometry> {
  static constexpr int kMaxTokens = kWindowAttentionMaxTokens;
  static constexpr int kMaxTableRows = kWindowAttentionMaxTableRows;
  static constexpr bool kTableAlwaysShared = true;
};

// What every kernel needs to know about the problem, for a window geometry (WindowAttentionShape: 2D).
template <typename Geometry>
struct WindowAttentionShapeT {
  Geometry g;
  int64_t C;        // nH * hd: channels of the output; qkv rows have 3C
  int64_t windows;  // B * windows per image
  int N, nH, hd;
  int table_rows;   // rows of the relative position bias table: (2 wh - 1)(2 ww - 1) in 2D
  int rel_offset;   // g.relative_index(0, 0): relative_index(i, j) = code_i - code_j + rel_offset with
                    // code_t = relative_index(t, 0) - rel_offset (2D: (t / ww)(2 ww - 1) + t % ww)
};
using WindowAttentionShape = WindowAttentionShapeT<WindowGeometry>;

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
  p.rel_offset = static_cast<int>(g.relative_index(0, 0));
  return p;
}

// How the rows of a window map onto blocks: G threads per row, rows_per_block rows per block, `chunks` blocks per
// window (forward, dq) or per group of windows (dk, dv).
struct WindowAttentionBlocks {
  int slices, threads, rows_per_block, chunks;
};

template <typename Geometry>
inline WindowAttentionBlocks window_attention_blocks(const WindowAttentionShapeT<Geometry>& p) {
  WindowAttentionBlocks b;
  b.slices = p.hd <= 32 ? 1 : (p.hd <= 64 ? 2 : 4);
  const int max_rows = kWindowAttentionMaxThreads / b.slices;
  const int rows = p.N < max_rows ? p.N : max_rows;
  b.threads = (rows * b.slices + 31) / 32 * 32;
  b.rows_per_block = b.threads / b.slices;
  b.chunks = (p.N + b.rows_per_block - 1) / b.rows_per_block;
  return b;
}

template <typename Geometry>
inline bool window_attention_supported(const WindowAttentionShapeT<Geometry>& p) {
  using L = WindowLayout<Geometry>;
  return p.N >= 1 && p.N <= L::kMaxTokens && p.hd >= 1 && p.hd <= kWindowAttentionMaxHeadDim &&
         p.table_rows >= 1 && p.table_rows <= L::kMaxTableRows && p.nH >= 1 && p.nH <= 65535 && p.windows >= 1 &&
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

// Rows of the d_pad scratch of launch_window_attention{,_v2,_3d}_bwd: groups * chunks.
template <typename Geometry>
inline int64_t window_attention_pad_partials(const WindowAttentionShapeT<Geometry>& p, int64_t windows_per_group) {
  return window_attention_groups(p.windows, windows_per_group) * window_attention_blocks(p).chunks;
}

// Launchers (defined in window_attention_fwd.cuh / window_attention_bwd.cuh, instantiated for the element types of
// VK_WINDOW_ATTENTION_TYPES in window_attention_{fwd,bwd}_kernels.cu). Each returns cudaErrorInvalidValue for a
// problem window_attention_supported refuses, else the launch's error.

// out (B, H, W, C) and lse (windows, nH, N) from qkv (B, H, W, 3C); pad_row (3C); table (table_rows, nH) in the
// compute type (float, double for double).
template <typename T>
cudaError_t launch_window_attention_fwd(const T* qkv, const T* pad_row, const typename Acc<T>::type* table, T* out,
                                        typename Acc<T>::type* lse, const WindowAttentionShape& p, double scale,
                                        cudaStream_t stream);

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
                                        cudaStream_t stream);

// grad_table (table_rows, nH) from d_bias (nH, N, N) summed over windows, both D = double; every entry is written.
template <typename D>
cudaError_t launch_window_attention_bias_grad(const D* d_bias, D* grad_table, int64_t wh, int64_t ww,
                                              int64_t num_heads, cudaStream_t stream);

// The element types the launchers are instantiated for (the binding dispatches over the same four).
#define VK_WINDOW_ATTENTION_TYPES(X) X(float) X(double) X(__half) X(__nv_bfloat16)

#define VK_WINDOW_ATTENTION_EXTERN(T)                                                                             \
  extern template cudaError_t launch_window_attention_fwd<T>(const T*, const T*, const Acc<T>::type*, T*,        \
                                                             Acc<T>::type*, const WindowAttentionShape&, double, \
                                                             cudaStream_t);                                       \
  extern template cudaError_t launch_window_attention_bwd<T>(                                                     \
      const T*, const T*, const T*, const Acc<T>::type*, const T*, const Acc<T>::type*, Acc<T>::type*, T*,        \
      Acc<T>::type*, Acc<T>::type*, const WindowAttentionShape&, double, int64_t, cudaStream_t);
VK_WINDOW_ATTENTION_TYPES(VK_WINDOW_ATTENTION_EXTERN)
#undef VK_WINDOW_ATTENTION_EXTERN
extern template cudaError_t launch_window_attention_bias_grad<double>(const double*, double*, int64_t, int64_t,
                                                                      int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace vitkernels
