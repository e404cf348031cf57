// Body of the CPU bias + GELU op (csrc/cpu/bias_gelu.cpp), compiled per instruction set by cpu_isa_each.h.
// Deliberately no include guard.
//   forward:  y = gelu(x + bias)                    (rows of C values, bias (C,) broadcast over rows)
//   backward: dx = dy * gelu'(x + bias),  d_bias += column sums of dx

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

// Rows [begin, end) of y = gelu(x + bias); y may alias x. x and y are stored as S (float, double or bfloat16: a
// bfloat16 row is widened and rounded in registers, cpu_simd.h), the bias and the arithmetic are in T = compute_t<S>.
// The approximation is a template parameter, so each loop holds only its own constants (in registers, not reloaded
// every vector).
template <typename S, bool tanh_approx>
void bias_gelu_rows_impl(const S* x, const compute_t<S>* bias, S* y, int64_t begin, int64_t end, int64_t C) {
  using T = compute_t<S>;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  for (int64_t r = begin; r < end; ++r) {
    const S* xr = x + r * C;
    S* yr = y + r * C;
    if (r + kRowsAhead < end) prefetch_row(xr + kRowsAhead * C, C);
    for (int64_t j = 0; j < full; j += L) store(yr + j, vgelu<T>(load(xr + j) + load(bias + j), tanh_approx));
    if (tail) {
      store_partial(yr + full, vgelu<T>(load_partial(xr + full, tail) + load_partial(bias + full, tail), tanh_approx),
                    tail);
    }
  }
}

template <typename S>
void bias_gelu_rows(const S* x, const compute_t<S>* bias, S* y, int64_t begin, int64_t end, int64_t C,
                    bool tanh_approx) {
  if (tanh_approx) bias_gelu_rows_impl<S, true>(x, bias, y, begin, end, C);
  else bias_gelu_rows_impl<S, false>(x, bias, y, begin, end, C);
}

// Rows [begin, end) of dx = dy * gelu'(x + bias) (dx may alias dy); their column sums added into d_bias (C). dy, x and
// dx stored as S, bias and d_bias in T = compute_t<S> (as the forward).
template <typename S, bool tanh_approx>
void bias_gelu_backward_rows_impl(const S* dy, const S* x, const compute_t<S>* bias, S* dx, compute_t<S>* d_bias,
                                  int64_t begin, int64_t end, int64_t C) {
  using T = compute_t<S>;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  for (int64_t r = begin; r < end; ++r) {
    const S* dyr = dy + r * C;
    const S* xr = x + r * C;
    S* dxr = dx + r * C;
    if (r + kRowsAhead < end) {
      prefetch_row(dyr + kRowsAhead * C, C);
      prefetch_row(xr + kRowsAhead * C, C);
    }
    for (int64_t j = 0; j < full; j += L) {
      const auto g = load(dyr + j) * vgelu_grad<T>(load(xr + j) + load(bias + j), tanh_approx);
      store(dxr + j, g);
      store(d_bias + j, load(d_bias + j) + g);
    }
    if (tail) {
      const auto g = load_partial(dyr + full, tail) *
                     vgelu_grad<T>(load_partial(xr + full, tail) + load_partial(bias + full, tail), tanh_approx);
      store_partial(dxr + full, g, tail);
      store_partial(d_bias + full, load_partial(d_bias + full, tail) + g, tail);
    }
  }
}

template <typename S>
void bias_gelu_backward_rows(const S* dy, const S* x, const compute_t<S>* bias, S* dx, compute_t<S>* d_bias,
                             int64_t begin, int64_t end, int64_t C, bool tanh_approx) {
  if (tanh_approx) bias_gelu_backward_rows_impl<S, true>(dy, x, bias, dx, d_bias, begin, end, C);
  else bias_gelu_backward_rows_impl<S, false>(dy, x, bias, dx, d_bias, begin, end, C);
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
