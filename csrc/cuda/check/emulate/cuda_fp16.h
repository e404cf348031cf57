// CPU emulation of <cuda_fp16.h> for csrc/cuda/check/emulate_cuda.py (see cuda_runtime.h beside this): __half as
// IEEE binary16 bits, converted through the compiler's _Float16 (round to nearest even, subnormals included).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}

inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
