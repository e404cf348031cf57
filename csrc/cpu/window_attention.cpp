// Swin (shifted) window attention on CPU, fused: from the qkv Linear's output in original NHWC token order to the
// attention output in original order (semantics: vitkernels/reference/window_attention.py), forward and backward.
//
// Nothing image-sized is materialised: no rolled, padded or partitioned copy of qkv, no bias or mask tensor per
// window. One task is one window; each thread gathers the window's qkv rows by index math (shift and
// padding in the addressing, padded tokens read the qkv bias), computes S, the softmax and P v in its own
// cache-resident scratch and stores the output rows back at the tokens they came from. The relative position bias
// is expanded once per call into (nH, N, N) rows (a few KB, shared by all windows); the shifted-window mask is a
// comparison of the tokens' region ids. The backward recomputes P from the saved log-sum-exp and reduces the bias
// gradient over windows in per-thread double accumulators before scattering it into the table.
//
// The per-task code is in window_attention_kernel.h, compiled here for AVX-512, AVX2 and the baseline; the best
// one the CPU supports runs (VITKERNELS_CPU_ISA=avx512|avx2|baseline caps the choice, for tests and comparisons).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vitkernels/window_attention_args.h"
#include "vitkernels/window_geometry.h"

#if defined(__x86_64__) || defined(__SSE__)
#include <xmmintrin.h>
#define VK_HAS_MXCSR 1
#endif

namespace vitkernels {
namespace cpu {

constexpr int64_t kPad = 16;         // scratch strides are multiples of 16 elements: whole 64-byte vectors
constexpr double kMaskValue = -100;  // timm / official Swin: added across regions of the shifted image

// Everything a task needs; S is the storage type, T the compute type (float, or double for double).
template <typename S, typename T>
struct WindowAttentionArgs {
  WindowGeometry g;
  int64_t N, nH, hd, C;  // tokens per window, heads, head dim, nH * hd
  double scale;
  bool shifted;
  const S* qkv;          // (B, H, W, 3C)
  const S* pad_row;      // (3C): what a padded token's q, k, v are (the qkv Linear's bias, or zeros)
  const T* bias_rows;    // (nH, N, NP): table[rel(i, j), h], -inf for the padding columns j >= N
  T* lse;                // (B * nW, nH, N)
  S* out;                // forward: (B, H, W, C)
  const S* grad_out;     // backward: (B, H, W, C)
  const S* out_in;       // backward: the forward's output
  S* grad_qkv;           // backward: (B, H, W, 3C)
};

}  // namespace cpu
}  // namespace vitkernels

// --- the kernel body, once per instruction set ---------------------------------------------------------------------

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VK_CPU_X86 1
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types in inlined helpers: no ABI crosses a boundary

#ifdef VK_CPU_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#endif
#define VK_CPU_ISA avx512
#define VK_CPU_MR 6  // 6 x 2 zmm accumulators + 2 for B: 14 of 32 registers
#define VK_CPU_NV 2
#include "window_attention_kernel.h"
#undef VK_CPU_ISA
#undef VK_CPU_MR
#undef VK_CPU_NV
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define VK_CPU_ISA avx2
#define VK_CPU_MR 4  // a 64-byte vector is 2 ymm: 8 ymm accumulators + 2 for B, of 16
#define VK_CPU_NV 1
#include "window_attention_kernel.h"
#undef VK_CPU_ISA
#undef VK_CPU_MR
#undef VK_CPU_NV
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // VK_CPU_X86

#define VK_CPU_ISA baseline
#define VK_CPU_MR 2
#define VK_CPU_NV 1
#include "window_attention_kernel.h"
#undef VK_CPU_ISA
#undef VK_CPU_MR
#undef VK_CPU_NV

#pragma GCC diagnostic pop

namespace vitkernels {
namespace cpu {
namespace {

enum class Isa { kAvx512 = 0, kAvx2 = 1, kBaseline = 2 };  // ordered from most to least capable

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

Isa best_isa() {
#ifdef VK_CPU_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

// The CPU's best, capped by $VITKERNELS_CPU_ISA (read per call, so tests can run every path in one process).
Isa selected_isa() {
  static const Isa best = best_isa();
  const char* env = std::getenv("VITKERNELS_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  Isa cap;
  if (want == "avx512") cap = Isa::kAvx512;
  else if (want == "avx2") cap = Isa::kAvx2;
  else if (want == "baseline") cap = Isa::kBaseline;
  else TORCH_CHECK(false, "VITKERNELS_CPU_ISA must be avx512, avx2 or baseline, got '", want, "'");
  return static_cast<int>(cap) > static_cast<int>(best) ? cap : best;
}

// Flush-to-zero and denormals-are-zero for this thread while fp32 kernels run, restored after: tiny intermediate
// values (a masked softmax entry times a gradient) would otherwise become subnormal, and subnormal FMA operands
// cost ~100x. Results change only below 1.2e-38. Not used for the double path (gradcheck wants exact IEEE).
class FlushDenormals {
 public:
  explicit FlushDenormals(bool enable) {
#ifdef VK_HAS_MXCSR
    if (enable) {
      saved_ = _mm_getcsr();
      _mm_setcsr(saved_ | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
      active_ = true;
    }
#else
    (void)enable;
#endif
  }
  ~FlushDenormals() {
#ifdef VK_HAS_MXCSR
    if (active_) _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned int saved_ = 0;
  bool active_ = false;
};

using Problem = WindowAttentionProblem;

// (nH, N, NP) rows of the relative position bias, -inf in the padding columns (they then drop out of the softmax).
template <typename T>
std::vector<T> expand_bias(const Problem& p, const at::Tensor& table) {
  const int64_t NP = (p.N + kPad - 1) / kPad * kPad;
  const at::Tensor t = table.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* tab = t.const_data_ptr<T>();
  std::vector<T> rows(p.nH * p.N * NP, -std::numeric_limits<T>::infinity());
  for (int64_t h = 0; h < p.nH; ++h)
    for (int64_t i = 0; i < p.N; ++i)
      for (int64_t j = 0; j < p.N; ++j) rows[(h * p.N + i) * NP + j] = tab[p.g.relative_index(i, j) * p.nH + h];
  return rows;
}

template <typename S, typename T>
WindowAttentionArgs<S, T> make_args(const Problem& p, double scale, const at::Tensor& qkv, const at::Tensor& pad_row,
                                    const std::vector<T>& bias_rows, at::Tensor& lse) {
  WindowAttentionArgs<S, T> a{};
  a.g = p.g;
  a.N = p.N; a.nH = p.nH; a.hd = p.hd; a.C = p.C;
  a.scale = scale;
  a.shifted = p.g.shift_h > 0 || p.g.shift_w > 0;
  a.qkv = qkv.const_data_ptr<S>();
  a.pad_row = pad_row.const_data_ptr<S>();
  a.bias_rows = bias_rows.data();
  a.lse = lse.mutable_data_ptr<T>();
  return a;
}

}  // namespace

std::string window_attention_cpu_isa() { return isa_name(selected_isa()); }

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& qkv_in, const at::Tensor& table,
                                                        const std::optional<at::Tensor>& qkv_bias,
                                                        at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                        int64_t num_heads, double scale) {
  const Problem p =
      check_window_attention_args("window_attention", qkv_in, table, qkv_bias, window_size, shift_size, num_heads);
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  at::Tensor out = at::empty(p.out_shape(), qkv.options());
  at::Tensor lse = at::empty({p.windows(), p.nH, p.N}, qkv.options().dtype(window_attention_acc_type(qkv)));
  if (p.windows() == 0) return {out, lse};
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "vitkernels_window_attention_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const std::vector<T> bias_rows = expand_bias<T>(p, table);
    auto a = make_args<scalar_t, T>(p, scale, qkv, pad_row, bias_rows, lse);
    a.out = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.windows(), 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz(std::is_same<T, float>::value);
      std::vector<T> scratch(baseline::Scratch<T>::size(p.N, p.nH, p.hd), T(0));  // zero: padding stays zero
      std::vector<int64_t> source(p.N);
      switch (isa) {
#ifdef VK_CPU_X86
        case Isa::kAvx512: avx512::forward_windows(a, begin, end, scratch.data(), source.data()); break;
        case Isa::kAvx2: avx2::forward_windows(a, begin, end, scratch.data(), source.data()); break;
#endif
        default: baseline::forward_windows(a, begin, end, scratch.data(), source.data());
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& table,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, int64_t num_heads, double scale) {
  const char* op = "window_attention_backward";
  const Problem p = check_window_attention_args(op, qkv_in, table, qkv_bias, window_size, shift_size, num_heads);
  check_window_attention_backward_args(op, p, qkv_in, grad_out_in, out_in, lse_in);
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor out = out_in.to(qkv.scalar_type()).contiguous();
  at::Tensor lse = lse_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  at::Tensor grad_qkv = at::empty_like(qkv);  // every real token's row is written (each is in one window)
  const int64_t threads = at::get_num_threads();
  // Per-thread sums over windows: d_bias (nH, N, N) and the padded tokens' (dk, dv) (nH, 2, hd), in double.
  std::vector<double> d_bias(threads * p.nH * p.N * p.N, 0.0);
  std::vector<double> d_pad(threads * p.nH * 2 * p.hd, 0.0);
  const Isa isa = selected_isa();
  if (p.windows() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "vitkernels_window_attention_bwd_cpu",
                                    [&] {
      using T = at::opmath_type<scalar_t>;
      const std::vector<T> bias_rows = expand_bias<T>(p, table);
      auto a = make_args<scalar_t, T>(p, scale, qkv, pad_row, bias_rows, lse);
      a.grad_out = grad_out.const_data_ptr<scalar_t>();
      a.out_in = out.const_data_ptr<scalar_t>();
      a.grad_qkv = grad_qkv.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, p.windows(), 1, [&](int64_t begin, int64_t end) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid < threads, "window_attention_backward: thread ", tid, " beyond the ", threads, " expected");
        const FlushDenormals ftz(std::is_same<T, float>::value);
        std::vector<T> scratch(baseline::Scratch<T>::size(p.N, p.nH, p.hd), T(0));
        std::vector<int64_t> source(p.N);
        double* bias_acc = d_bias.data() + tid * p.nH * p.N * p.N;
        double* pad_acc = d_pad.data() + tid * p.nH * 2 * p.hd;
        switch (isa) {
#ifdef VK_CPU_X86
          case Isa::kAvx512: avx512::backward_windows(a, begin, end, scratch.data(), source.data(), bias_acc, pad_acc); break;
          case Isa::kAvx2: avx2::backward_windows(a, begin, end, scratch.data(), source.data(), bias_acc, pad_acc); break;
#endif
          default: baseline::backward_windows(a, begin, end, scratch.data(), source.data(), bias_acc, pad_acc);
        }
      });
    });
  }
  // Reduce the threads' sums, scatter d_bias into the table by relative position, assemble d qkv_bias.
  at::Tensor grad_table = at::zeros(table.sizes(), table.options().dtype(at::kDouble));
  double* gt = grad_table.mutable_data_ptr<double>();
  const int64_t NN = p.N * p.N;
  for (int64_t h = 0; h < p.nH; ++h) {
    for (int64_t ij = 0; ij < NN; ++ij) {
      double sum = 0;
      for (int64_t t = 0; t < threads; ++t) sum += d_bias[(t * p.nH + h) * NN + ij];
      gt[p.g.relative_index(ij / p.N, ij % p.N) * p.nH + h] += sum;
    }
  }
  at::Tensor grad_bias = at::empty({0}, qkv.options());
  if (qkv_bias.has_value()) {
    at::Tensor gb = at::zeros({3 * p.C}, qkv.options().dtype(at::kDouble));
    double* g = gb.mutable_data_ptr<double>();
    for (int64_t h = 0; h < p.nH; ++h) {
      for (int64_t d = 0; d < p.hd; ++d) {
        for (int64_t t = 0; t < threads; ++t) {
          const double* pad = d_pad.data() + (t * p.nH + h) * 2 * p.hd;
          g[p.C + h * p.hd + d] += pad[d];
          g[2 * p.C + h * p.hd + d] += pad[p.hd + d];
        }
      }
    }
    grad_bias = gb.to(qkv_bias->scalar_type());
  }
  return {grad_qkv, grad_table.to(table.scalar_type()), grad_bias};
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
