// Body of the CPU bias + residual op (csrc/cpu/bias_residual.cpp), compiled per instruction set by cpu_isa_each.h.
// Deliberately no include guard.
//   out = residual + scale[sample] * (y + bias)     (rows of C values; bias (C,) and scale optional)

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

// The value of row r: residual + s (y + bias), s = scale[r / rows_per_sample] (1 without scale); out may alias y.
template <typename T>
VK_INLINE void bias_residual_row(const T* y, const T* bias, const T* res, T s, bool scaled, T* out, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  const V vs = splat(s);
  auto value = [&](V yv, V bv, V rv) { const V branch = yv + bv; return rv + (scaled ? branch * vs : branch); };
  for (int64_t j = 0; j < full; j += L) {
    store(out + j, value(load(y + j), bias ? load(bias + j) : V{}, load(res + j)));
  }
  if (tail) {
    store_partial(out + full,
                  value(load_partial(y + full, tail), bias ? load_partial(bias + full, tail) : V{},
                        load_partial(res + full, tail)),
                  tail);
  }
}

template <typename T>
void bias_residual_rows(const T* y, const T* bias, const T* res, const T* scale, int64_t rows_per_sample, T* out,
                        int64_t begin, int64_t end, int64_t C) {
  for (int64_t r = begin; r < end; ++r) {
    const T s = scale ? scale[r / rows_per_sample] : T(1);
    if (r + kRowsAhead < end) {
      prefetch_row(y + (r + kRowsAhead) * C, C);
      prefetch_row(res + (r + kRowsAhead) * C, C);
    }
    bias_residual_row(y + r * C, bias, res + r * C, s, scale != nullptr, out + r * C, C);
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
