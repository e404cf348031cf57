// Argument checks of the 3D window attention op (csrc/cpu/window_attention_3d.cpp): every argument the kernels rely
// on, with a message naming it. torch.compile'd code and direct torch.ops.vitkernels.window_attention_3d calls skip
// the Python checks, so these are what makes the op safe. Every size the kernels form (padded axes, tokens per
// window, rows of the partitioned volume and their elements, the bias table, the (nH, N, N) bias rows) is checked to
// fit int64 before the geometry is built.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "vitkernels/window_attention_args.h"
#include "vitkernels/window_geometry_3d.h"

namespace vitkernels {

struct WindowAttention3DProblem {
  WindowGeometry3D g;
  int64_t N, nH, hd, C;  // tokens per window, heads, head dim, nH * hd
  int64_t windows() const { return g.B * g.windows_per_image(); }
  std::vector<int64_t> out_shape() const { return {g.B, g.d.n, g.h.n, g.w.n, C}; }
  bool shifted() const { return g.shifted(); }
};

// The problem of a forward (or backward) call, or a clear error naming the argument.
inline WindowAttention3DProblem check_window_attention_3d_args(const char* op, const at::Tensor& qkv,
                                                               const at::Tensor& table,
                                                               const std::optional<at::Tensor>& qkv_bias,
                                                               at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                               int64_t num_heads, bool pad_before_shift) {
  TORCH_CHECK(qkv.dim() == 5, op, ": qkv must be (B, D, H, W, 3 * num_heads * head_dim), got ", qkv.sizes());
  TORCH_CHECK(at::isFloatingType(qkv.scalar_type()), op, ": qkv must be a floating tensor, got ", qkv.scalar_type());
  const int64_t three_c = qkv.size(4);
  TORCH_CHECK(num_heads > 0 && three_c > 0 && three_c % num_heads == 0 && (three_c / num_heads) % 3 == 0, op,
              ": qkv.size(4) = ", three_c, " is not 3 * num_heads * head_dim with head_dim > 0 for num_heads = ",
              num_heads);
  TORCH_CHECK(window_size.size() == 3, op, ": window_size must have 3 entries (wd, wh, ww), got ", window_size);
  TORCH_CHECK(shift_size.size() == 3, op, ": shift_size must have 3 entries (sd, sh, sw), got ", shift_size);
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(window_size[a] > 0, op, ": window_size must be positive, got ", window_size);
    TORCH_CHECK(shift_size[a] >= 0 && shift_size[a] < window_size[a], op,
                ": shift_size must satisfy 0 <= shift < window_size per axis, got ", shift_size, " for window_size ",
                window_size);
  }
  const int64_t B = qkv.size(0), D = qkv.size(1), H = qkv.size(2), W = qkv.size(3);
  TORCH_CHECK(D > 0 && H > 0 && W > 0, op, ": the volume must be non-empty, got (D, H, W) = (", D, ", ", H, ", ", W,
              ")");
  // The padded axes, windows per image, tokens per window and partitioned rows, checked before any is formed.
  const int64_t sizes[3] = {D, H, W};
  const char* padded_names[3] = {"padded depth", "padded height", "padded width"};
  int64_t padded[3];
  for (int a = 0; a < 3; ++a) {
    const int64_t windows = sizes[a] / window_size[a] + (sizes[a] % window_size[a] != 0);
    padded[a] = checked_product(op, padded_names[a], windows, window_size[a]);
  }
  const int64_t N = checked_product(op, "tokens per window (wd * wh * ww)",
                                    checked_product(op, "wd * wh", window_size[0], window_size[1]), window_size[2]);
  const int64_t rows = checked_product(
      op, "partitioned rows (B * Dp * Hp * Wp)",
      checked_product(op, "B * Dp * Hp", checked_product(op, "B * Dp", B, padded[0]), padded[1]), padded[2]);
  checked_product(op, "partitioned elements (rows * channels)", rows, three_c);
  // The kernels hold (nH, N, N) bias rows and per-item N x N scratch.
  checked_product(op, "bias rows (num_heads * N * N)", checked_product(op, "N * N", N, N), num_heads);
  const int64_t table_rows = checked_product(
      op, "relative_position_bias_table rows (2wd-1)(2wh-1)(2ww-1)",
      checked_product(op, "(2wd-1)(2wh-1)", 2 * window_size[0] - 1, 2 * window_size[1] - 1), 2 * window_size[2] - 1);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == table_rows && table.size(1) == num_heads, op,
              ": relative_position_bias_table must be ((2wd-1)(2wh-1)(2ww-1), num_heads) = (", table_rows, ", ",
              num_heads, "), got ", table.sizes());
  TORCH_CHECK(at::isFloatingType(table.scalar_type()), op,
              ": relative_position_bias_table must be a floating tensor, got ", table.scalar_type());
  if (qkv_bias.has_value()) {
    TORCH_CHECK(qkv_bias->dim() == 1 && qkv_bias->size(0) == three_c, op, ": qkv_bias must be (", three_c, "), got ",
                qkv_bias->sizes());
    TORCH_CHECK(at::isFloatingType(qkv_bias->scalar_type()), op, ": qkv_bias must be a floating tensor, got ",
                qkv_bias->scalar_type());
  }
  check_same_device(op, qkv, table, "relative_position_bias_table");
  if (qkv_bias.has_value()) check_same_device(op, qkv, *qkv_bias, "qkv_bias");

  WindowAttention3DProblem p;
  p.g = WindowGeometry3D::make(B, D, H, W, window_size[0], window_size[1], window_size[2], shift_size[0],
                               shift_size[1], shift_size[2], pad_before_shift);
  p.N = N;
  p.nH = num_heads;
  p.hd = three_c / (3 * num_heads);
  p.C = num_heads * p.hd;
  return p;
}

// The backward's extra inputs: grad_out and out of the output's shape, the forward's log-sum-exp.
inline void check_window_attention_3d_backward_args(const char* op, const WindowAttention3DProblem& p,
                                                    const at::Tensor& qkv, const at::Tensor& grad_out,
                                                    const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> shape = p.out_shape();
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape) && out.sizes() == at::IntArrayRef(shape), op,
              ": grad_out and out must be ", at::IntArrayRef(shape), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), op, ": grad_out must be a floating tensor, got ",
              grad_out.scalar_type());
  const auto acc = window_attention_acc_type(qkv);
  TORCH_CHECK(lse.numel() == p.windows() * p.nH * p.N && lse.scalar_type() == acc, op,
              ": lse must be the forward's (B * nW, nH, N) ", acc, " log-sum-exp");
  check_same_device(op, qkv, grad_out, "grad_out");
  check_same_device(op, qkv, out, "out");
  check_same_device(op, qkv, lse, "lse");
}

}  // namespace vitkernels
