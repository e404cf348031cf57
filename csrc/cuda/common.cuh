// Generic helpers of the runtime-only CUDA kernel headers (*.cuh): the accumulation type of an element type and the
// conversions to and from it, and the grid size of a grid-stride launch. Needs only the CUDA runtime (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vitkernels {
namespace cuda {

// Math in float for float / half / bfloat16 elements, in double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even into the element type.
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Blocks of `threads` for `work` items of a grid-stride loop: at least 1, at most 2^20 (far more than any GPU runs
// at once; the loop covers the rest).
inline unsigned int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < (int64_t{1} << 20) ? (blocks > 0 ? blocks : 1) : (int64_t{1} << 20));
}

}  // namespace cuda
}  // namespace vitkernels
