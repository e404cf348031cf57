// CUDA fused cyclic shift + window partition and its inverse: the launch API the torch binding
// (window_partition.cpp) calls. Host code only (no torch headers, no kernels): the kernels and these launchers are
// compiled by nvcc in window_partition_kernels.cu, the binding by the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "vitkernels/window_geometry.h"

namespace vitkernels {
namespace cuda {

// out (B * windows, wh * ww, C) from x (B, H, W, C), rows of `row_bytes` bytes: the windows of the cyclically
// shifted (and zero-padded) map, in window order (vitkernels/reference/window_partition.py).
cudaError_t launch_window_partition(const void* x, void* out, const WindowGeometry& g, int64_t row_bytes,
                                   cudaStream_t stream);

// out (B, H, W, C) from windows (B * windows, wh * ww, C): the inverse (padding dropped, shift undone).
cudaError_t launch_window_reverse(const void* windows, void* out, const WindowGeometry& g, int64_t row_bytes,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace vitkernels
