// The Swin V2 window attention backward kernels, instantiated once for every element type the binding dispatches
// over (VK_WINDOW_ATTENTION_TYPES). Runtime-only (no torch headers): compiled in parallel with the binding, which sees
// only the declarations in window_attention_v2.cuh. (The table gradient is V1's, instantiated in
// window_attention_bwd_kernels.cu.)
#include "window_attention_v2_bwd.cuh"

namespace vitkernels {
namespace cuda {

#define VK_INSTANTIATE(T)                                                                                          \
  template cudaError_t launch_window_attention_v2_bwd<T>(                                                          \
      const T*, const T*, const T*, const Acc<T>::type*, const Acc<T>::type*, const T*, const Acc<T>::type*,      \
      Acc<T>::type*, T*, Acc<T>::type*, Acc<T>::type*, Acc<T>::type*, const WindowAttentionShape&, int64_t,       \
      cudaStream_t);
VK_WINDOW_ATTENTION_TYPES(VK_INSTANTIATE)
#undef VK_INSTANTIATE

}  // namespace cuda
}  // namespace vitkernels
