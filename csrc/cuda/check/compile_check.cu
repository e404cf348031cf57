// Compile-only translation unit: instantiates every runtime-only CUDA kernel header so that
// `nvcc -c` catches build breaks on a machine without a GPU or a CUDA build of torch (see .ci/run).
#include "../window_partition.cuh"

namespace vitkernels {
namespace cuda {
cudaError_t compile_check_window_partition(const void* x, void* out, cudaStream_t stream) {
  const auto g = WindowGeometry::make(2, 9, 10, 7, 7, 3, 3);
  cudaError_t err = launch_window_partition(x, out, g, 96 * 2, stream);
  if (err != cudaSuccess) return err;
  return launch_window_reverse(out, const_cast<void*>(x), g, 96 * 2, stream);
}
}  // namespace cuda
}  // namespace vitkernels
