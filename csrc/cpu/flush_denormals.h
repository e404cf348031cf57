// Flush-to-zero / denormals-are-zero for the calling thread while a CPU kernel runs (restored on scope exit).
//
// Tiny intermediate values (a masked softmax entry times a gradient) would otherwise become subnormal, and subnormal
// FMA operands cost ~100x on x86. Results change only below 1.2e-38. Used for fp32 math, not for the double path
// (gradcheck wants exact IEEE). The same class as V1's in window_attention.cpp, which can include this header instead.
#pragma once

#if defined(__x86_64__) || defined(__SSE__)
#include <xmmintrin.h>
#define VK_HAS_MXCSR 1
#endif

namespace vitkernels {
namespace cpu {

class ScopedFlushDenormals {
 public:
  explicit ScopedFlushDenormals(bool enable) {
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
  ~ScopedFlushDenormals() {
#ifdef VK_HAS_MXCSR
    if (active_) _mm_setcsr(saved_);
#endif
  }
  ScopedFlushDenormals(const ScopedFlushDenormals&) = delete;
  ScopedFlushDenormals& operator=(const ScopedFlushDenormals&) = delete;

 private:
  unsigned int saved_ = 0;
  bool active_ = false;
};

}  // namespace cpu
}  // namespace vitkernels
