// torch binding of the CUDA shift + partition kernels (launch API: window_partition.cuh). Host code, compiled by the
// host compiler: the kernels are in window_partition_kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "vitkernels/window_attention_args.h"
#include "window_partition.cuh"

namespace vitkernels {

at::Tensor window_partition_cuda(const at::Tensor& x, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  TORCH_CHECK(x.dim() == 4, "window_partition: x must be (B, H, W, C), got ", x.sizes());
  const auto g = checked_window_geometry("window_partition", x.size(0), x.size(1), x.size(2), x.size(3), window_size,
                                         shift_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty({g.B * g.windows_per_image(), g.tokens_per_window(), x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::launch_window_partition(src.const_data_ptr(), out.mutable_data_ptr(), g,
                                               x.size(3) * x.element_size(), at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor window_reverse_cuda(const at::Tensor& windows, int64_t height, int64_t width, at::IntArrayRef window_size,
                               at::IntArrayRef shift_size) {
  TORCH_CHECK(windows.dim() == 3, "window_reverse: windows must be (B * num_windows, wh * ww, C), got ",
              windows.sizes());
  auto g = checked_window_geometry("window_reverse", 1, height, width, windows.size(2), window_size, shift_size);
  TORCH_CHECK(windows.size(1) == g.tokens_per_window() && windows.size(0) % g.windows_per_image() == 0,
              "window_reverse: windows must be (B * ", g.windows_per_image(), ", ", g.tokens_per_window(), ", C), got ",
              windows.sizes());
  g = checked_window_geometry("window_reverse", windows.size(0) / g.windows_per_image(), height, width,
                              windows.size(2), window_size, shift_size);
  const c10::cuda::CUDAGuard guard(windows.device());
  const at::Tensor src = windows.contiguous();
  at::Tensor out = at::empty({g.B, height, width, windows.size(2)}, windows.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::launch_window_reverse(src.const_data_ptr(), out.mutable_data_ptr(), g,
                                             windows.size(2) * windows.element_size(),
                                             at::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(vitkernels, CUDA, m) {
  m.impl("window_partition", &window_partition_cuda);
  m.impl("window_reverse", &window_reverse_cuda);
}

}  // namespace vitkernels
