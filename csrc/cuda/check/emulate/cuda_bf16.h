// CPU emulation of <cuda_bf16.h> for csrc/cuda/check/emulate_cuda.py (see cuda_runtime.h beside this): bfloat16 as
// the top 16 bits of a float, rounded to nearest even (NaN kept quiet).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  } else {
    h.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}
