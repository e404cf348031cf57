// The 3D window attention forward kernels, instantiated once for every element type the binding dispatches over
// (VK_WINDOW_ATTENTION_TYPES). Runtime-only (no torch headers): compiled in parallel with the binding, which sees only
// the declarations in window_attention_3d.cuh.
#include "window_attention_3d_fwd.cuh"

namespace vitkernels {
namespace cuda {

#define VK_INSTANTIATE(T)                                                                                          \
  template cudaError_t launch_window_attention_3d_fwd<T>(const T*, const T*, const Acc<T>::type*, T*,             \
                                                         Acc<T>::type*, const WindowAttentionShape3D&, double,    \
                                                         cudaStream_t);
VK_WINDOW_ATTENTION_TYPES(VK_INSTANTIATE)
#undef VK_INSTANTIATE

}  // namespace cuda
}  // namespace vitkernels
