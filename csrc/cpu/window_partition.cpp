// Fused cyclic shift + window partition (and its inverse) on CPU: one pass that copies each token's C channels
// straight to its window row, instead of roll + pad + view/permute/contiguous (three full copies in timm).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>

#include "vitkernels/window_geometry.h"

namespace vitkernels {
namespace {

WindowGeometry geometry_from(int64_t B, int64_t H, int64_t W, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  TORCH_CHECK(window_size.size() == 2 && shift_size.size() == 2, "window_size and shift_size must be pairs");
  TORCH_CHECK(window_size[0] > 0 && window_size[1] > 0, "window_size must be positive, got ", window_size);
  TORCH_CHECK(shift_size[0] >= 0 && shift_size[0] < window_size[0] && shift_size[1] >= 0 && shift_size[1] < window_size[1],
              "shift_size must satisfy 0 <= shift < window_size, got ", shift_size);
  TORCH_CHECK(H > 0 && W > 0, "height and width must be positive, got ", H, "x", W);
  return WindowGeometry::make(B, H, W, window_size[0], window_size[1], shift_size[0], shift_size[1]);
}

// Rows per parallel task: enough bytes per task to amortise scheduling.
int64_t grain_for(int64_t row_bytes) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_bytes, 1)); }

}  // namespace

at::Tensor window_partition_cpu(const at::Tensor& x, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  TORCH_CHECK(x.dim() == 4, "window_partition: x must be (B, H, W, C), got ", x.sizes());
  const auto g = geometry_from(x.size(0), x.size(1), x.size(2), window_size, shift_size);
  const int64_t C = x.size(3);
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty({g.B * g.windows_per_image(), g.tokens_per_window(), C}, x.options());
  const int64_t row_bytes = C * x.element_size();
  const char* src_ptr = static_cast<const char*>(src.const_data_ptr());
  char* dst_ptr = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, g.num_window_rows(), grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t token = g.source_token(row);
      char* dst = dst_ptr + row * row_bytes;
      if (token < 0) {
        std::memset(dst, 0, row_bytes);  // bit pattern 0 is +0.0 for every float dtype
      } else {
        std::memcpy(dst, src_ptr + token * row_bytes, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor window_reverse_cpu(const at::Tensor& windows, int64_t height, int64_t width, at::IntArrayRef window_size,
                              at::IntArrayRef shift_size) {
  TORCH_CHECK(windows.dim() == 3, "window_reverse: windows must be (B * num_windows, wh * ww, C), got ", windows.sizes());
  auto g = geometry_from(1, height, width, window_size, shift_size);
  TORCH_CHECK(windows.size(1) == g.tokens_per_window(), "window_reverse: windows.size(1) must be wh * ww = ",
              g.tokens_per_window(), ", got ", windows.size(1));
  TORCH_CHECK(windows.size(0) % g.windows_per_image() == 0, "window_reverse: windows.size(0) = ", windows.size(0),
              " is not a multiple of the ", g.windows_per_image(), " windows per image");
  g = WindowGeometry::make(windows.size(0) / g.windows_per_image(), height, width, g.wh, g.ww, g.shift_h, g.shift_w);
  const int64_t C = windows.size(2);
  const at::Tensor src = windows.contiguous();
  at::Tensor out = at::empty({g.B, height, width, C}, windows.options());
  const int64_t row_bytes = C * windows.element_size();
  const char* src_ptr = static_cast<const char*>(src.const_data_ptr());
  char* dst_ptr = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, g.B * height * width, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      std::memcpy(dst_ptr + token * row_bytes, src_ptr + g.window_row(token) * row_bytes, row_bytes);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("window_partition", &window_partition_cpu);
  m.impl("window_reverse", &window_reverse_cpu);
}

}  // namespace vitkernels
