// Body of the CPU patch-merging gather + LayerNorm op (csrc/cpu/patch_merging.cpp), compiled per instruction set by
// cpu_isa_each.h. Deliberately no include guard.
// Output row (b, i, j) of (B, H2, W2) is the LayerNorm over 4C channels of the 2x2 neighbours of (2i, 2j) in timm's
// order (0,0), (1,0), (0,1), (1,1) (as (dy, dx)), zeros past an odd edge, gathered straight from the NHWC input.

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

struct MergeGeometry {
  int64_t H, W, C, H2, W2;
  // The k-th (0..3) neighbour of output row o: its flat input token, or -1 past the edge.
  VK_INLINE int64_t source(int64_t o, int k) const {
    const int64_t b = o / (H2 * W2), i = (o / W2) % H2, j = o % W2;
    const int64_t y = 2 * i + (k & 1), x = 2 * j + (k >> 1);
    return (y < H && x < W) ? (b * H + y) * W + x : -1;
  }
};

// n values of storage type S as T: copied, or bfloat16 widened to float (exact).
template <typename S, typename T>
VK_INLINE void load_row(const S* src, T* dst, int64_t n) {
  if constexpr (std::is_same<S, c10::BFloat16>::value) {
    bf16_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
  }
}

// n values of T stored as S: copied, or float rounded to bfloat16 (to nearest even, as ATen's conversion).
template <typename S, typename T>
VK_INLINE void store_row(const T* src, S* dst, int64_t n) {
  if constexpr (std::is_same<S, c10::BFloat16>::value) {
    float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
  }
}

// The 4C values of output row o gathered into row (of the compute type T; x of storage type S).
template <typename S, typename T>
VK_INLINE void gather_merged_row(const S* x, const MergeGeometry& m, int64_t o, T* row) {
  for (int k = 0; k < 4; ++k) {
    const int64_t src = m.source(o, k);
    T* dst = row + k * m.C;
    if (src < 0) {
      for (int64_t c = 0; c < m.C; ++c) dst[c] = 0;
    } else {
      load_row(x + src * m.C, dst, m.C);
    }
  }
}

// Output rows [begin, end). x, out: storage type S (the compute type T, or bfloat16 with T = float: each row is
// widened, normalised and rounded in the scratch, never the whole tensor). row, out_row: scratch of 4C (out_row is
// used only when S is not T).
template <typename S, typename T>
void patch_merging_norm_rows(const S* x, int64_t H, int64_t W, int64_t C, const T* w, const T* b, T eps, S* out,
                             T* mean, T* rstd, T* row, T* out_row, int64_t begin, int64_t end) {
  const MergeGeometry m{H, W, C, (H + 1) / 2, (W + 1) / 2};
  const int64_t C4 = 4 * C;
  for (int64_t o = begin; o < end; ++o) {
    gather_merged_row(x, m, o, row);
    if constexpr (std::is_same<S, T>::value) {
      layernorm_row(row, out + o * C4, w, b, C4, eps, mean + o, rstd + o);
    } else {
      layernorm_row(row, out_row, w, b, C4, eps, mean + o, rstd + o);
      store_row(out_row, out + o * C4, C4);
    }
  }
}

// Backward of output rows [begin, end): scatters the input gradient of every real neighbour (each input token is
// the neighbour of exactly one output row); adds d_weight, d_bias into sums (2, 4C). g, x, dx: storage type S as
// above. row, d_row, g_row: scratch of 4C (g_row used only when S is not T).
template <typename S, typename T>
void patch_merging_norm_backward_rows(const S* g, const S* x, int64_t H, int64_t W, int64_t C, const T* mean,
                                      const T* rstd, const T* w, S* dx, T* sums, T* row, T* d_row, T* g_row,
                                      int64_t begin, int64_t end) {
  const MergeGeometry m{H, W, C, (H + 1) / 2, (W + 1) / 2};
  const int64_t C4 = 4 * C;
  for (int64_t o = begin; o < end; ++o) {
    gather_merged_row(x, m, o, row);
    const T* g_o;
    if constexpr (std::is_same<S, T>::value) {
      g_o = g + o * C4;
    } else {
      load_row(g + o * C4, g_row, C4);
      g_o = g_row;
    }
    layernorm_row_backward(g_o, row, mean[o], rstd[o], w, C4, static_cast<const T*>(nullptr), d_row, sums, sums + C4);
    for (int k = 0; k < 4; ++k) {
      const int64_t src = m.source(o, k);
      if (src < 0) continue;
      store_row(d_row + k * m.C, dx + src * m.C, m.C);
    }
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
