// The 3D window attention backward kernels, instantiated once for every element type the binding dispatches over
// (VK_WINDOW_ATTENTION_TYPES), and the 3D bias-table gradient for double. Runtime-only (no torch headers): compiled
// in parallel with the binding, which sees only the declarations in window_attention_3d.cuh.
#include "window_attention_3d_bwd.cuh"

namespace vitkernels {
namespace cuda {

#define VK_INSTANTIATE(T)                                                                                          \
  template cudaError_t launch_window_attention_3d_bwd<T>(const T*, const T*, const T*, const Acc<T>::type*,       \
                                                         const T*, const Acc<T>::type*, Acc<T>::type*, T*,        \
                                                         Acc<T>::type*, Acc<T>::type*,                            \
                                                         const WindowAttentionShape3D&, double, int64_t,          \
                                                         cudaStream_t);
VK_WINDOW_ATTENTION_TYPES(VK_INSTANTIATE)
#undef VK_INSTANTIATE

template cudaError_t launch_window_attention_3d_bias_grad<double>(const double*, double*, int64_t, int64_t, int64_t,
                                                                  int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace vitkernels
