// Body of the CPU packed GEMM (csrc/cpu/gemm.cpp), compiled per instruction set by cpu_isa_each.h.
// Deliberately no include guard.
//   C (M, N) = A (M, K) B (K, N) [+ bias (N) on every row],  float32,
//   A(i, k) = A[i * a_row + k * a_col],  B(k, j) = B[k * b_row + j * b_col],  C[i * ldc + j]
// The operands are packed into the layouts the register tile reads (Goto / BLIS): a block of A's rows as panels of
// kMR rows, k-major (a[k * kMR + r]), a block of B's columns as panels of kNR columns, k-major (b[k * kNR + c]), both
// zero-padded to whole panels. The tile (kMR x kNR: 6 x 2 vectors, 12 accumulators) then streams its two panels
// with unit stride whatever the operands' strides were (x W^T, g W, g^T x: the three products of a Linear).

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

constexpr int kGemmMR = VK_CPU_TILE2_MR;
constexpr int kGemmNR = 2 * Vec<float>::lanes;

// The GELU epilogue (gemm.h GemmEpilogue) of a finished tile's first `rows` rows, given as `tile` (rows of kVectors
// vectors: the product plus the bias), into C: gelu(tile), tile also stored to side where it is not null; or, for
// a grad epilogue, tile * gelu'(side), its column sums added into col_sums where that is not null. side at the
// tile's origin, row stride ep.ld_side.
template <int kVectors>
VK_INLINE void gemm_epilogue_rows(const float* tile, int rows, float* C, int64_t ldc, const GemmEpilogue& ep,
                                  float* side, float* col_sums) {
  using V = Vec<float>::type;
  constexpr int L = Vec<float>::lanes;
  if (!ep.grad) {
    for (int r = 0; r < rows; ++r) {
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) {
        const V pre = load(tile + (r * kVectors + v) * L);
        if (side != nullptr) store(side + r * ep.ld_side + v * L, pre);
        store(C + r * ldc + v * L, vgelu<float>(pre, ep.tanh));
      }
    }
    return;
  }
  V sums[kVectors] = {};
  for (int r = 0; r < rows; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) {
      const V g = load(tile + (r * kVectors + v) * L) * vgelu_grad<float>(load(side + r * ep.ld_side + v * L), ep.tanh);
      store(C + r * ldc + v * L, g);
      sums[v] += g;
    }
  }
  if (col_sums != nullptr) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) store(col_sums + v * L, load(col_sums + v * L) + sums[v]);
  }
}

// The kMR x (kVectors vectors) tile C = init + sum_k a[k] b[k]^T over packed panels a (K x kMR) and b (K x kNR, its
// first kVectors vectors read); init: C's own values (add_c) plus the bias row (bias, kVectors vectors, or none).
// C's rows are ldc apart. kVectors = 2 is the whole tile (12 accumulators); 1 serves a last panel of at most one
// vector's columns (out_features 24 = 16 + 8, 72 = 64 + 8 on AVX2), which reads the first half of its packed panel
// only instead of a whole tile's multiply-adds over zero columns (six accumulators do not hide the FMA latency as
// twelve do, but a half-width panel is one of several).
// ep: the product's epilogue (gemm.h) where this is its last pass over K, else null; side and col_sums: ep's side
// matrix and column sums at the tile's origin (col_sums null: none summed).
template <int kVectors>
VK_INLINE void gemm_packed_tile(int64_t K, const float* a, const float* b, float* C, int64_t ldc, bool add_c,
                                const float* bias, const GemmEpilogue* ep = nullptr, float* side = nullptr,
                                float* col_sums = nullptr) {
  static_assert(kVectors == 1 || kVectors == 2, "a tile is one or two vectors wide");
  using V = Vec<float>::type;
  constexpr int L = Vec<float>::lanes;
  V acc[kGemmMR][kVectors];
  V init[kVectors];
#pragma GCC unroll 2
  for (int v = 0; v < kVectors; ++v) init[v] = bias != nullptr ? load(bias + v * L) : V{};
#pragma GCC unroll 16
  for (int r = 0; r < kGemmMR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) acc[r][v] = add_c ? load(C + r * ldc + v * L) + init[v] : init[v];
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    V bk[kVectors];
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) bk[v] = load(b + k * kGemmNR + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < kGemmMR; ++r) {
      const float x = a[k * kGemmMR + r];
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) acc[r][v] += x * bk[v];
    }
  }
  if (ep == nullptr || !ep->gelu) {
#pragma GCC unroll 16
    for (int r = 0; r < kGemmMR; ++r) {
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) store(C + r * ldc + v * L, acc[r][v]);
    }
    return;
  }
  // the epilogue reads the tile from memory: handing it the accumulator array itself made GCC keep that array in
  // memory through the K loop (half the GEMM's speed)
  alignas(64) float tile[kGemmMR * kVectors * L];
#pragma GCC unroll 16
  for (int r = 0; r < kGemmMR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) store(tile + (r * kVectors + v) * L, acc[r][v]);
  }
  gemm_epilogue_rows<kVectors>(tile, kGemmMR, C, ldc, *ep, side, col_sums);
}

// A tile on C's ragged edge (rows < kMR or cols < kNR): a whole half-width tile straight into C where it fits,
// otherwise through a tile in scratch (the half-width one when cols <= one vector).
// With an epilogue (ep, side and col_sums as gemm_packed_tile's), the scratch tile reads and writes a scratch side
// tile (the real side's rows x cols, zeros elsewhere) and the column sums are taken over the real rows as they are
// copied out (a padded row holds the bias alone, which must not be summed).
VK_INLINE void gemm_packed_edge(int64_t K, const float* a, const float* b, float* C, int64_t ldc, bool add_c,
                                const float* bias, int rows, int cols, const GemmEpilogue* ep = nullptr,
                                float* side = nullptr, float* col_sums = nullptr) {
  constexpr int L = Vec<float>::lanes;
  const bool half = cols <= L;
  if (half && rows == kGemmMR && cols == L) {
    gemm_packed_tile<1>(K, a, b, C, ldc, add_c, bias, ep, side, col_sums);
    return;
  }
  alignas(64) float tile[kGemmMR * kGemmNR];
  alignas(64) float bias_tile[kGemmNR] = {};
  for (int r = 0; r < kGemmMR; ++r) {
    for (int c = 0; c < kGemmNR; ++c) tile[r * kGemmNR + c] = add_c && r < rows && c < cols ? C[r * ldc + c] : 0.0f;
  }
  if (bias != nullptr) {
    for (int c = 0; c < cols; ++c) bias_tile[c] = bias[c];
  }
  const float* tile_bias = bias != nullptr ? bias_tile : nullptr;
  const bool gelu = ep != nullptr && ep->gelu;
  // (zeroed only for a grad epilogue, which reads it past the real rows and columns: the plain edge tile, on
  // every product's ragged edge, pays nothing for it)
  alignas(64) float side_tile[kGemmMR * kGemmNR];
  GemmEpilogue tile_ep;
  if (gelu) {
    tile_ep = *ep;
    tile_ep.ld_side = kGemmNR;
    if (ep->grad) {
      std::fill(side_tile, side_tile + kGemmMR * kGemmNR, 0.0f);
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) side_tile[r * kGemmNR + c] = side[r * ep->ld_side + c];
      }
    }
  }
  float* tile_side = gelu && (ep->grad || side != nullptr) ? side_tile : nullptr;
  const GemmEpilogue* tile_epilogue = gelu ? &tile_ep : nullptr;
  if (half) gemm_packed_tile<1>(K, a, b, tile, kGemmNR, add_c, tile_bias, tile_epilogue, tile_side);
  else gemm_packed_tile<2>(K, a, b, tile, kGemmNR, add_c, tile_bias, tile_epilogue, tile_side);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) C[r * ldc + c] = tile[r * kGemmNR + c];
  }
  if (gelu && !ep->grad && side != nullptr) {
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < cols; ++c) side[r * ep->ld_side + c] = side_tile[r * kGemmNR + c];
    }
  }
  if (gelu && ep->grad && col_sums != nullptr) {
    for (int c = 0; c < cols; ++c) {
      float sum = 0.0f;
      for (int r = 0; r < rows; ++r) sum += tile[r * kGemmNR + c];
      col_sums[c] += sum;
    }
  }
}

// Floats the caller leaves writable past a packed A block: gemm_pack_a's whole-vector stores may run that far.
constexpr int64_t kGemmPackSlack = Vec<float>::lanes;

// Rows [0, rows) x k [0, kc) of A into panels of kMR rows: out[panel][k][r], rows past the end zero; out needs
// kGemmPackSlack floats of room past the panels.
inline void gemm_pack_a(int64_t rows, int64_t kc, const float* A, int64_t a_row, int64_t a_col, float* out) {
  using V = Vec<float>::type;
  constexpr int L = Vec<float>::lanes;
  for (int64_t i0 = 0; i0 < rows; i0 += kGemmMR, out += kGemmMR * kc) {
    const int mr = static_cast<int>(std::min<int64_t>(kGemmMR, rows - i0));
    const float* src = A + i0 * a_row;
    if (mr == kGemmMR && a_row == 1) {
      // A = g^T (g^T x): kMR consecutive values per k
      for (int64_t k = 0; k < kc; ++k) {
#pragma GCC unroll 16
        for (int r = 0; r < kGemmMR; ++r) out[k * kGemmMR + r] = src[k * a_col + r];
      }
    } else if (mr == kGemmMR && a_col == 1) {
      // row-major A (x, g): kMR rows read side by side, each with unit stride
      const float* row[kGemmMR];
      for (int r = 0; r < kGemmMR; ++r) row[r] = src + r * a_row;
      // the next panel's rows (when they are the block's) are prefetched a panel ahead, a line per row per vector
      // of k: A comes from L3 or memory (a fresh activation or gradient) and the pack otherwise waits on every line
      const float* ahead = i0 + 2 * kGemmMR <= rows ? src + kGemmMR * a_row : nullptr;
      int64_t k = 0;
      if constexpr (L >= kGemmMR) {
        // L values of each row at a time, transposed in registers (rows past kMR zero); each transposed vector
        // holds one k's kMR values and is stored whole: its L - kMR extra lanes land on the next k's slots, which
        // the next store (or the scalar tail, or the next panel) overwrites, and past the last panel on the
        // kGemmPackSlack floats the caller leaves there
        for (; k + L <= kc; k += L) {
          if (ahead != nullptr) {
#pragma GCC unroll 16
            for (int i = 0; i < kGemmMR; ++i) __builtin_prefetch(ahead + i * a_row + k, 0, 3);
          }
          V r[L];
#pragma GCC unroll 16
          for (int i = 0; i < L; ++i) r[i] = i < kGemmMR ? load(row[i] + k) : V{};
          transpose_in_registers<float>(r);
#pragma GCC unroll 16
          for (int j = 0; j < L; ++j) store(out + (k + j) * kGemmMR, r[j]);
        }
      }
      for (; k < kc; ++k) {
#pragma GCC unroll 16
        for (int r = 0; r < kGemmMR; ++r) out[k * kGemmMR + r] = row[r][k];
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int r = 0; r < mr; ++r) out[k * kGemmMR + r] = src[r * a_row + k * a_col];
        for (int r = mr; r < kGemmMR; ++r) out[k * kGemmMR + r] = 0.0f;
      }
    }
  }
}

// Columns [0, cols) x k [0, kc) of B into panels of kNR columns: out[panel][k][c], columns past the end zero.
inline void gemm_pack_b(int64_t kc, int64_t cols, const float* B, int64_t b_row, int64_t b_col, float* out) {
  constexpr int L = Vec<float>::lanes;
  for (int64_t j0 = 0; j0 < cols; j0 += kGemmNR, out += kGemmNR * kc) {
    const int nr = static_cast<int>(std::min<int64_t>(kGemmNR, cols - j0));
    const float* src = B + j0 * b_col;
    if (nr == kGemmNR && b_col == 1) {
      // row-major B (W in g W, x in g^T x): two vectors per k
      for (int64_t k = 0; k < kc; ++k) {
        store(out + k * kGemmNR, load(src + k * b_row));
        store(out + k * kGemmNR + L, load(src + k * b_row + L));
      }
    } else if (b_row == 1 && nr == kGemmNR) {
      // B = W^T (x W^T): each column is a weight row, unit stride over k; L columns x L values of k at a time,
      // transposed in registers into L rows of the panel's half
      int64_t k = 0;
      for (; k + L <= kc; k += L) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          Vec<float>::type r[L];
#pragma GCC unroll 16
          for (int c = 0; c < L; ++c) r[c] = load(src + (h * L + c) * b_col + k);
          transpose_in_registers<float>(r);
#pragma GCC unroll 16
          for (int j = 0; j < L; ++j) store(out + (k + j) * kGemmNR + h * L, r[j]);
        }
      }
      for (; k < kc; ++k) {
        for (int c = 0; c < kGemmNR; ++c) out[k * kGemmNR + c] = src[c * b_col + k];
      }
    } else if (b_row == 1) {
      // B = W^T, a ragged last panel
      for (int c = 0; c < nr; ++c) {
        const float* col = src + c * b_col;
        for (int64_t k = 0; k < kc; ++k) out[k * kGemmNR + c] = col[k];
      }
      for (int c = nr; c < kGemmNR; ++c) {
        for (int64_t k = 0; k < kc; ++k) out[k * kGemmNR + c] = 0.0f;
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int c = 0; c < nr; ++c) out[k * kGemmNR + c] = src[k * b_row + c * b_col];
        for (int c = nr; c < kGemmNR; ++c) out[k * kGemmNR + c] = 0.0f;
      }
    }
  }
}

// C rows [0, rows) x columns [0, cols) from a packed A block (rows x kc) and packed B block (kc x cols): the tiles,
// B's panels outer (one kc x kNR panel stays in L1 while the A block, in L2, streams past it). ep: the product's
// epilogue where this is its last pass over K (else null), its side and col_sums at this block's origin.
inline void gemm_packed_block(int64_t rows, int64_t cols, int64_t kc, const float* a, const float* b, float* C,
                              int64_t ldc, bool add_c, const float* bias, const GemmEpilogue* ep) {
  for (int64_t j = 0; j < cols; j += kGemmNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kGemmNR, cols - j));
    const float* bp = b + j * kc;  // panel j / kNR
    const float* bj = bias != nullptr ? bias + j : nullptr;
    float* sums = ep != nullptr && ep->col_sums != nullptr ? ep->col_sums + j : nullptr;
    for (int64_t i = 0; i < rows; i += kGemmMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kGemmMR, rows - i));
      float* c = C + i * ldc + j;
      float* side = ep != nullptr && ep->side != nullptr ? ep->side + i * ep->ld_side + j : nullptr;
      if (mr == kGemmMR && nr == kGemmNR) gemm_packed_tile<2>(kc, a + i * kc, bp, c, ldc, add_c, bj, ep, side, sums);
      else gemm_packed_edge(kc, a + i * kc, bp, c, ldc, add_c, bj, mr, nr, ep, side, sums);
    }
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
