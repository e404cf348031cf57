// Body of the CPU bias + residual + LayerNorm op (csrc/cpu/bias_residual_layernorm.cpp), compiled per instruction
// set by cpu_isa_each.h after bias_residual_kernel.h (whose row function it uses). Deliberately no include guard.
//   forward:  x1 = residual + scale[sample] * (y + bias),  out = LayerNorm(x1) * weight + ln_bias
//   backward: g = d_x1 + LayerNorm'(d_out),  d_residual = g,  d_y = scale g,  d_bias += d_y,
//             d_weight += d_out xhat,  d_ln_bias += d_out

#include "bias_residual_kernel.h"

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

// Rows [begin, end); x1 may alias y. mean, rstd: one value per row.
template <typename T>
void bias_residual_layernorm_rows(const T* y, const T* bias, const T* res, const T* scale, int64_t rows_per_sample,
                                  const T* weight, const T* ln_bias, T eps, T* x1, T* out, T* mean, T* rstd,
                                  int64_t begin, int64_t end, int64_t C) {
  for (int64_t r = begin; r < end; ++r) {
    const T s = scale ? scale[r / rows_per_sample] : T(1);
    if (r + kRowsAhead < end) {
      prefetch_row(y + (r + kRowsAhead) * C, C);
      prefetch_row(res + (r + kRowsAhead) * C, C);
    }
    T* x1r = x1 + r * C;
    bias_residual_row(y + r * C, bias, res + r * C, s, scale != nullptr, x1r, C);
    layernorm_row(x1r, out + r * C, weight, ln_bias, C, eps, mean + r, rstd + r);
  }
}

// Rows [begin, end) of the backward. d_x1 may be null (no gradient reached x1 directly); d_y is written only when
// scale is given (else d_y = d_residual). sums: (3, C) column sums d_bias, d_weight, d_ln_bias.
template <typename T>
void bias_residual_layernorm_backward_rows(const T* d_out, const T* d_x1, const T* x1, const T* mean, const T* rstd,
                                           const T* weight, const T* scale, int64_t rows_per_sample, T* d_res,
                                           T* d_y, T* sums, int64_t begin, int64_t end, int64_t C) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  for (int64_t r = begin; r < end; ++r) {
    T* g = d_res + r * C;
    if (r + kRowsAhead < end) {
      prefetch_row(d_out + (r + kRowsAhead) * C, C);
      prefetch_row(x1 + (r + kRowsAhead) * C, C);
      if (d_x1) prefetch_row(d_x1 + (r + kRowsAhead) * C, C);
    }
    layernorm_row_backward(d_out + r * C, x1 + r * C, mean[r], rstd[r], weight, C, d_x1 ? d_x1 + r * C : nullptr, g,
                           sums + C, sums + 2 * C);
    // d_bias += d_y = s g
    const V vs = splat(scale ? scale[r / rows_per_sample] : T(1));
    T* dyr = scale ? d_y + r * C : nullptr;
    for (int64_t j = 0; j < full; j += L) {
      const V dy = scale ? load(g + j) * vs : load(g + j);
      if (dyr) store(dyr + j, dy);
      store(sums + j, load(sums + j) + dy);
    }
    if (tail) {
      const V dy = scale ? load_partial(g + full, tail) * vs : load_partial(g + full, tail);
      if (dyr) store_partial(dyr + full, dy, tail);
      store_partial(sums + full, load_partial(sums + full, tail) + dy, tail);
    }
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
