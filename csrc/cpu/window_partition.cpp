// Fused cyclic shift + window partition (and its inverse) on CPU: one pass that copies each token's C channels
// straight to its window row, instead of roll + pad + view/permute/contiguous (three full copies in timm).
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>

#include "vitkernels/window_attention_args.h"
#include "vitkernels/window_geometry.h"

namespace vitkernels {
namespace {

// Rows per parallel task: enough bytes per task to amortise scheduling.
int64_t grain_for(int64_t row_bytes) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_bytes, 1)); }

}  // namespace

at::Tensor window_partition_cpu(const at::Tensor& x, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  TORCH_CHECK(x.dim() == 4, "window_partition: x must be (B, H, W, C), got ", x.sizes());
  const auto g = checked_window_geometry("window_partition", x.size(0), x.size(1), x.size(2), x.size(3), window_size,
                                         shift_size);
  const int64_t C = x.size(3);
  at::Tensor out = at::empty({g.B * g.windows_per_image(), g.tokens_per_window(), C}, x.options());
  if (out.numel() == 0) return out;  // B == 0 or C == 0: nothing to copy (and no null pointer to memcpy)
  const at::Tensor src = x.contiguous();
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
  const char* op = "window_reverse";
  TORCH_CHECK(windows.dim() == 3, op, ": windows must be (B * num_windows, wh * ww, C), got ", windows.sizes());
  const int64_t C = windows.size(2);
  auto g = checked_window_geometry(op, 1, height, width, C, window_size, shift_size);
  TORCH_CHECK(windows.size(1) == g.tokens_per_window(), op, ": windows.size(1) must be wh * ww = ",
              g.tokens_per_window(), ", got ", windows.size(1));
  TORCH_CHECK(windows.size(0) % g.windows_per_image() == 0, op, ": windows.size(0) = ", windows.size(0),
              " is not a multiple of the ", g.windows_per_image(), " windows per image");
  g = checked_window_geometry(op, windows.size(0) / g.windows_per_image(), height, width, C, window_size, shift_size);
  at::Tensor out = at::empty({g.B, height, width, C}, windows.options());
  if (out.numel() == 0) return out;
  const at::Tensor src = windows.contiguous();
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
