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

#include "../masking.cuh"

namespace vitkernels {
namespace cuda {
template <typename T>
cudaError_t compile_check_masking(const T* a, const int64_t* idx, T* b, int64_t* restore,
                                  typename Acc<T>::type* partial, cudaStream_t stream) {
  cudaError_t err = launch_gather_rows<T>(a, idx, a, b, 2, 3, 7, 8, 3, 0, stream);
  if (err == cudaSuccess) err = launch_restore_and_mask<T>(idx, restore, b, 2, 7, 3, stream);
  if (err == cudaSuccess) err = launch_unshuffle_fwd<T>(a, idx, a, nullptr, b, 2, 7, 3, 8, 0, stream);
  if (err == cudaSuccess) err = launch_unshuffle_bwd<T>(a, idx, b, partial, 2, 7, 3, 8, stream);
  return err;
}
template cudaError_t compile_check_masking<float>(const float*, const int64_t*, float*, int64_t*, float*, cudaStream_t);
template cudaError_t compile_check_masking<double>(const double*, const int64_t*, double*, int64_t*, double*,
                                                   cudaStream_t);
template cudaError_t compile_check_masking<__half>(const __half*, const int64_t*, __half*, int64_t*, float*,
                                                   cudaStream_t);
template cudaError_t compile_check_masking<__nv_bfloat16>(const __nv_bfloat16*, const int64_t*, __nv_bfloat16*,
                                                          int64_t*, float*, cudaStream_t);
}  // namespace cuda
}  // namespace vitkernels

#include "../window_attention.cuh"

namespace vitkernels {
namespace cuda {
template <typename T>
cudaError_t compile_check_window_attention(const T* a, T* b, typename Acc<T>::type* acc, double* d,
                                           cudaStream_t stream) {
  // Every slice count G: head_dim 32 (G = 1; N = 49, shifted, padded), 48 (G = 2; N = 144), 128 (G = 4; N = 256,
  // 4 chunks of rows).
  const WindowAttentionShape shapes[3] = {
      make_window_attention_shape(WindowGeometry::make(2, 9, 10, 7, 7, 3, 3), 3, 32),
      make_window_attention_shape(WindowGeometry::make(1, 24, 24, 12, 12, 6, 6), 2, 48),
      make_window_attention_shape(WindowGeometry::make(1, 16, 16, 16, 16, 0, 0), 1, 128)};
  cudaError_t err = cudaSuccess;
  for (const WindowAttentionShape& p : shapes) {
    const int64_t per_group = window_attention_windows_per_group(p.windows, p.nH, 264);
    if (err == cudaSuccess) err = launch_window_attention_fwd<T>(a, a, acc, b, acc, p, 0.125, stream);
    if (err == cudaSuccess)
      err = launch_window_attention_bwd<T>(a, a, a, acc, a, acc, acc, b, acc, acc, p, 0.125, per_group, stream);
    if (err == cudaSuccess) err = launch_window_attention_bias_grad(d, d, p.g.wh, p.g.ww, p.nH, stream);
  }
  return err;
}
template cudaError_t compile_check_window_attention<float>(const float*, float*, float*, double*, cudaStream_t);
template cudaError_t compile_check_window_attention<double>(const double*, double*, double*, double*, cudaStream_t);
template cudaError_t compile_check_window_attention<__half>(const __half*, __half*, float*, double*, cudaStream_t);
template cudaError_t compile_check_window_attention<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, float*,
                                                                   double*, cudaStream_t);
}  // namespace cuda
}  // namespace vitkernels
