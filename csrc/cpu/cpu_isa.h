// Run-time choice of the instruction set for the CPU kernels that are compiled once per instruction set
// (cpu_isa_each.h), and the flush-to-zero guard they run under. Header-only; no torch beyond c10's checks.
#pragma once

#include <c10/util/BFloat16.h>  // cpu_simd.h: the row kernels' bfloat16 loads and stores
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>  // cpu_simd.h: std::index_sequence

#if defined(__x86_64__) || defined(__SSE__)
#include <immintrin.h>  // the MXCSR, and the reciprocal estimates of cpu_simd.h
#define VK_HAS_MXCSR 1
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VK_CPU_X86 1
#endif

namespace vitkernels {
namespace cpu {

enum class Isa { kAvx512 = 0, kAvx2 = 1, kBaseline = 2 };  // ordered from most to least capable

// The type a row kernel computes in for values stored as S: float for bfloat16, S itself otherwise. Here, outside
// the per-instruction-set namespaces, so the kernels (cpu_simd.h's bodies) and their host code share one definition.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, c10::BFloat16>, float, S>;

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

inline Isa best_isa() {
#ifdef VK_CPU_X86
  __builtin_cpu_init();
#ifndef VK_CPU_NO_AVX512  // built without the AVX-512 code (cpu_isa_each.h)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
#endif
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

// The CPU's best, capped by $VITKERNELS_CPU_ISA (read per call, so tests can run every path in one process).
inline Isa selected_isa() {
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

}  // namespace cpu
}  // namespace vitkernels

// VK_CPU_CALL(isa, fn, args...): fn(args...) from the namespace of the instruction set `isa` (an Isa value).
#if defined(VK_CPU_X86) && defined(VK_CPU_NO_AVX512)  // no AVX-512 code built; best_isa() never picks it
#define VK_CPU_CALL(isa, fn, ...)                                                   \
  do {                                                                              \
    switch (isa) {                                                                  \
      case ::vitkernels::cpu::Isa::kAvx512:                                         \
      case ::vitkernels::cpu::Isa::kAvx2: ::vitkernels::cpu::avx2::fn(__VA_ARGS__); break; \
      default: ::vitkernels::cpu::baseline::fn(__VA_ARGS__);                        \
    }                                                                               \
  } while (0)
#elif defined(VK_CPU_X86)
#define VK_CPU_CALL(isa, fn, ...)                                                   \
  do {                                                                              \
    switch (isa) {                                                                  \
      case ::vitkernels::cpu::Isa::kAvx512: ::vitkernels::cpu::avx512::fn(__VA_ARGS__); break; \
      case ::vitkernels::cpu::Isa::kAvx2: ::vitkernels::cpu::avx2::fn(__VA_ARGS__); break;     \
      default: ::vitkernels::cpu::baseline::fn(__VA_ARGS__);                        \
    }                                                                               \
  } while (0)
#else
#define VK_CPU_CALL(isa, fn, ...) ::vitkernels::cpu::baseline::fn(__VA_ARGS__)
#endif

// VK_CPU_CALL_COMPUTE(T, isa, fn, args...): VK_CPU_CALL for a kernel compiled per compute type T, where T = double
// (the tests' float64 references and gradcheck; no model runs it for speed) always runs the baseline instruction
// set's code, so that no AVX2 / AVX-512 copy of its double instantiation is compiled (a third of a window-attention
// unit's compile time went to double). Use it in a template (T dependent, or inside a function template: the branch
// not taken is then not instantiated).
#define VK_CPU_CALL_COMPUTE(T, isa, fn, ...)                                         \
  do {                                                                               \
    if constexpr (std::is_same<T, double>::value) {                                  \
      ::vitkernels::cpu::baseline::fn(__VA_ARGS__);                                  \
    } else {                                                                         \
      VK_CPU_CALL(isa, fn, __VA_ARGS__);                                             \
    }                                                                                \
  } while (0)
