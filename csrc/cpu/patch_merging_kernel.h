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

template <typename T>
VK_INLINE void gather_merged_row(const T* x, const MergeGeometry& m, int64_t o, T* row) {
  for (int k = 0; k < 4; ++k) {
    const int64_t src = m.source(o, k);
    T* dst = row + k * m.C;
    if (src < 0) {
      for (int64_t c = 0; c < m.C; ++c) dst[c] = 0;
    } else {
      const T* s = x + src * m.C;
      for (int64_t c = 0; c < m.C; ++c) dst[c] = s[c];
    }
  }
}

// Output rows [begin, end); row: scratch of 4C.
template <typename T>
void patch_merging_norm_rows(const T* x, int64_t H, int64_t W, int64_t C, const T* w, const T* b, T eps, T* out,
                             T* mean, T* rstd, T* row, int64_t begin, int64_t end) {
  const MergeGeometry m{H, W, C, (H + 1) / 2, (W + 1) / 2};
  const int64_t C4 = 4 * C;
  for (int64_t o = begin; o < end; ++o) {
    gather_merged_row(x, m, o, row);
    layernorm_row(row, out + o * C4, w, b, C4, eps, mean + o, rstd + o);
  }
}

// Backward of output rows [begin, end): scatters the input gradient of every real neighbour (each input token is
// the neighbour of exactly one output row); adds d_weight, d_bias into sums (2, 4C). row, d_row: scratch of 4C.
template <typename T>
void patch_merging_norm_backward_rows(const T* g, const T* x, int64_t H, int64_t W, int64_t C, const T* mean,
                                      const T* rstd, const T* w, T* dx, T* sums, T* row, T* d_row, int64_t begin,
                                      int64_t end) {
  const MergeGeometry m{H, W, C, (H + 1) / 2, (W + 1) / 2};
  const int64_t C4 = 4 * C;
  for (int64_t o = begin; o < end; ++o) {
    gather_merged_row(x, m, o, row);
    layernorm_row_backward(g + o * C4, row, mean[o], rstd[o], w, C4, static_cast<const T*>(nullptr), d_row, sums,
                           sums + C4);
    for (int k = 0; k < 4; ++k) {
      const int64_t src = m.source(o, k);
      if (src < 0) continue;
      const T* s = d_row + k * m.C;
      T* d = dx + src * m.C;
      for (int64_t c = 0; c < m.C; ++c) d[c] = s[c];
    }
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
