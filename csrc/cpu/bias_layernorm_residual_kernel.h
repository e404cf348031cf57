// Body of the CPU post-norm residual op (csrc/cpu/bias_layernorm_residual.cpp), compiled per instruction set by
// cpu_isa_each.h. Deliberately no include guard.
//   forward:  x1 = y + bias,  n = LayerNorm(x1) * weight + ln_bias,  out = residual + scale[sample] * n
//   backward: d_n = scale d_out,  d_y = LayerNorm'(d_n) (x1 recomputed from y and bias),  d_bias += d_y,
//             d_weight += d_n xhat,  d_ln_bias += d_n  (d_residual = d_out: the caller's)

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

// x1 = y + bias (a copy of y without bias) into dst, which may alias y.
template <typename T>
VK_INLINE void add_bias_row(const T* y, const T* bias, T* dst, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  for (int64_t j = 0; j < full; j += L) store(dst + j, bias ? load(y + j) + load(bias + j) : load(y + j));
  if (tail) {
    const V v = load_partial(y + full, tail);
    store_partial(dst + full, bias ? v + load_partial(bias + full, tail) : v, tail);
  }
}

// o = res + s o (res + o without a scale: timm's x + drop_path(n), multiplication by 1 skipped).
template <typename T>
VK_INLINE void residual_row(T* o, const T* res, T s, bool scaled, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  const V vs = splat(s);
  auto value = [&](V ov, V rv) { return rv + (scaled ? ov * vs : ov); };
  for (int64_t j = 0; j < full; j += L) store(o + j, value(load(o + j), load(res + j)));
  if (tail) store_partial(o + full, value(load_partial(o + full, tail), load_partial(res + full, tail)), tail);
}

// Rows [begin, end); out may alias y (the in-place variant). mean, rstd: one value per row. Each row is brought
// into L1 once: x1 is built in out's row, normalised there, then the residual added, all while the row is hot.
template <typename T>
void bias_layernorm_residual_rows(const T* y, const T* bias, const T* res, const T* scale, int64_t rows_per_sample,
                                  const T* weight, const T* ln_bias, T eps, T* out, T* mean, T* rstd, int64_t begin,
                                  int64_t end, int64_t C) {
  for (int64_t r = begin; r < end; ++r) {
    const T s = scale ? scale[r / rows_per_sample] : T(1);
    if (r + kRowsAhead < end) {
      prefetch_row(y + (r + kRowsAhead) * C, C);
      prefetch_row(res + (r + kRowsAhead) * C, C);
    }
    T* o = out + r * C;
    add_bias_row(y + r * C, bias, o, C);
    layernorm_row(o, o, weight, ln_bias, C, eps, mean + r, rstd + r);
    residual_row(o, res + r * C, s, scale != nullptr, C);
  }
}

// Rows [begin, end) of the backward. scratch: 2 C values (x1 and the scaled gradient of the row). sums: (3, C)
// column sums d_bias, d_weight, d_ln_bias.
template <typename T>
void bias_layernorm_residual_backward_rows(const T* d_out, const T* y, const T* bias, const T* mean, const T* rstd,
                                           const T* weight, const T* scale, int64_t rows_per_sample, T* d_y,
                                           T* scratch, T* sums, int64_t begin, int64_t end, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  T* x1 = scratch;
  T* dn = scratch + C;
  for (int64_t r = begin; r < end; ++r) {
    if (r + kRowsAhead < end) {
      prefetch_row(d_out + (r + kRowsAhead) * C, C);
      prefetch_row(y + (r + kRowsAhead) * C, C);
    }
    add_bias_row(y + r * C, bias, x1, C);
    const T* g = d_out + r * C;
    if (scale) {  // d_n = s d_out
      const V vs = splat(scale[r / rows_per_sample]);
      for (int64_t j = 0; j < full; j += L) store(dn + j, load(g + j) * vs);
      if (tail) store_partial(dn + full, load_partial(g + full, tail) * vs, tail);
      g = dn;
    }
    T* dyr = d_y + r * C;
    layernorm_row_backward(g, x1, mean[r], rstd[r], weight, C, static_cast<const T*>(nullptr), dyr, sums + C,
                           sums + 2 * C);
    for (int64_t j = 0; j < full; j += L) store(sums + j, load(sums + j) + load(dyr + j));
    if (tail) store_partial(sums + full, load_partial(sums + full, tail) + load_partial(dyr + full, tail), tail);
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
