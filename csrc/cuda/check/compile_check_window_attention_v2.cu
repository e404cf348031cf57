// Compile-only translation unit for the Swin V2 CUDA kernels (window_attention_v2.cuh): every slice count and dtype,
// so that `nvcc -c` (.ci/run compiles every file in this folder) catches build breaks without a GPU or CUDA torch.
#include "../window_attention_v2.cuh"

namespace vitkernels {
namespace cuda {
template <typename T>
cudaError_t compile_check_window_attention_v2(const T* a, T* b, typename Acc<T>::type* acc, cudaStream_t stream) {
  // head_dim 32 (G = 1; N = 64, window 8 shifted, padded), 48 (G = 2; N = 144), 128 (G = 4; N = 256: 2 chunks)
  const WindowAttentionShape shapes[3] = {
      make_window_attention_shape(WindowGeometry::make(2, 9, 10, 8, 8, 4, 4), 3, 32),
      make_window_attention_shape(WindowGeometry::make(1, 24, 24, 12, 12, 6, 6), 2, 48),
      make_window_attention_shape(WindowGeometry::make(1, 16, 16, 16, 16, 0, 0), 1, 128)};
  cudaError_t err = cudaSuccess;
  for (const WindowAttentionShape& p : shapes) {
    const int64_t per_group = window_attention_windows_per_group(p.windows, p.nH, 264);
    if (err == cudaSuccess) err = launch_window_attention_v2_fwd<T>(a, a, acc, acc, b, acc, p, stream);
    if (err == cudaSuccess)
      err = launch_window_attention_v2_bwd<T>(a, a, a, acc, acc, a, acc, acc, b, acc, acc, acc, p, per_group, stream);
  }
  return err;
}
template cudaError_t compile_check_window_attention_v2<float>(const float*, float*, float*, cudaStream_t);
template cudaError_t compile_check_window_attention_v2<double>(const double*, double*, double*, cudaStream_t);
template cudaError_t compile_check_window_attention_v2<__half>(const __half*, __half*, float*, cudaStream_t);
template cudaError_t compile_check_window_attention_v2<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, float*,
                                                                      cudaStream_t);
}  // namespace cuda
}  // namespace vitkernels
