// CUDA kernels for the fused cyclic shift + window partition and its inverse, and the launchers declared in
// window_partition.cuh. Runtime-only (no torch headers): compiled by nvcc beside the binding (window_partition.cpp),
// which the host compiler compiles.
#include <cstdint>

#include "common.cuh"  // grid_for
#include "window_partition.cuh"

namespace vitkernels {
namespace cuda {

// One thread per copy unit (T = 1 to 16 bytes): rows are whole tokens of `units_per_row` units each.
template <typename T>
__global__ void window_partition_kernel(const T* __restrict__ x, T* __restrict__ out, WindowGeometry g,
                                        int64_t units_per_row) {
  const int64_t total = g.num_window_rows() * units_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / units_per_row;
    const int64_t u = i - row * units_per_row;
    const int64_t token = g.source_token(row);
    out[i] = token < 0 ? T{} : x[token * units_per_row + u];  // T{} is all-zero bits = +0.0
  }
}

template <typename T>
__global__ void window_reverse_kernel(const T* __restrict__ windows, T* __restrict__ out, WindowGeometry g,
                                      int64_t units_per_row) {
  const int64_t total = g.B * g.H * g.W * units_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t token = i / units_per_row;
    const int64_t u = i - token * units_per_row;
    out[i] = windows[g.window_row(token) * units_per_row + u];
  }
}

// Widest copy unit that divides the row and keeps both pointers aligned.
inline int copy_unit_bytes(const void* a, const void* b, int64_t row_bytes) {
  const auto addr = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  for (int unit = 16; unit > 1; unit /= 2) {
    if (row_bytes % unit == 0 && addr % unit == 0) return unit;
  }
  return 1;
}

// Calls launch(T{}) with the unsigned type T of `unit` bytes.
template <typename Launch>
cudaError_t dispatch_unit(int unit, Launch&& launch) {
  switch (unit) {
    case 16: return launch(uint4{});
    case 8: return launch(uint2{});
    case 4: return launch(uint32_t{});
    case 2: return launch(uint16_t{});
    default: return launch(uint8_t{});
  }
}

cudaError_t launch_window_partition(const void* x, void* out, const WindowGeometry& g, int64_t row_bytes,
                                   cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int unit = copy_unit_bytes(x, out, row_bytes);
  const int64_t units = row_bytes / unit;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    window_partition_kernel<T><<<grid_for(g.num_window_rows() * units, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(out), g, units);
    return cudaGetLastError();
  };
  return dispatch_unit(unit, launch);
}

cudaError_t launch_window_reverse(const void* windows, void* out, const WindowGeometry& g, int64_t row_bytes,
                                  cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int unit = copy_unit_bytes(windows, out, row_bytes);
  const int64_t units = row_bytes / unit;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    window_reverse_kernel<T><<<grid_for(g.B * g.H * g.W * units, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(windows), static_cast<T*>(out), g, units);
    return cudaGetLastError();
  };
  return dispatch_unit(unit, launch);
}

}  // namespace cuda
}  // namespace vitkernels
