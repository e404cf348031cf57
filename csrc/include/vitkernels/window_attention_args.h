// Argument checks and shared host-side helpers of the window ops (window_partition / window_reverse and window
// attention), used by the CPU and CUDA torch bindings (csrc/cpu/window_*.cpp, csrc/cuda/window_*.cu) so they refuse
// the same calls with the same messages. Needs ATen (unlike window_geometry.h, which the runtime-only CUDA headers
// include).
//
// These checks are what makes the ops safe: torch.compile'd code and direct torch.ops.vitkernels.* calls skip the
// Python checks. Every size the kernels form from the arguments (padded image, tokens per window, rows of the
// partitioned tensor, their elements, the bias table) is checked to fit int64 before any of it is computed.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "vitkernels/window_geometry.h"

namespace vitkernels {

struct WindowAttentionProblem {
  WindowGeometry g;
  int64_t N, nH, hd, C;  // tokens per window, heads, head dim, nH * hd
  int64_t windows() const { return g.B * g.windows_per_image(); }
  std::vector<int64_t> out_shape() const { return {g.B, g.H, g.W, C}; }
  bool shifted() const { return g.shift_h > 0 || g.shift_w > 0; }
};

inline void check_same_device(const char* op, const at::Tensor& qkv, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == qkv.device(), op, ": ", name, " must be on qkv's device ", qkv.device(), ", got ",
              t.device());
}

// a * b, or a clear error when it overflows int64 (a, b >= 0).
inline int64_t checked_product(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &out), op, ": ", what, " = ", a, " * ", b, " overflows int64");
  return out;
}

// The geometry of B images of H x W tokens of C channels cut into windows, or a clear error naming the argument:
// window and shift are pairs with window > 0 and 0 <= shift < window (the shift may exceed the image when the
// window does), H, W > 0, B, C >= 0, and the padded image, the tokens per window and the partitioned tensor's rows
// and elements fit int64.
inline WindowGeometry checked_window_geometry(const char* op, int64_t B, int64_t H, int64_t W, int64_t C,
                                              at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  TORCH_CHECK(window_size.size() == 2, op, ": window_size must be a pair, got ", window_size);
  TORCH_CHECK(shift_size.size() == 2, op, ": shift_size must be a pair, got ", shift_size);
  TORCH_CHECK(window_size[0] > 0 && window_size[1] > 0, op, ": window_size must be positive, got ", window_size);
  TORCH_CHECK(shift_size[0] >= 0 && shift_size[0] < window_size[0] && shift_size[1] >= 0 &&
                  shift_size[1] < window_size[1],
              op, ": shift_size must satisfy 0 <= shift < window_size, got ", shift_size, " for window_size ",
              window_size);
  TORCH_CHECK(H > 0 && W > 0, op, ": the image must be non-empty, got height ", H, " and width ", W);
  TORCH_CHECK(B >= 0 && C >= 0, op, ": negative batch or channels (", B, ", ", C, ")");
  const WindowGeometry g = WindowGeometry::make(B, H, W, window_size[0], window_size[1], shift_size[0],
                                                shift_size[1]);
  const int64_t Hp = checked_product(op, "padded height (window_size[0] * windows per column)", g.nWh, g.wh);
  const int64_t Wp = checked_product(op, "padded width (window_size[1] * windows per row)", g.nWw, g.ww);
  checked_product(op, "tokens per window (window_size[0] * window_size[1])", g.wh, g.ww);
  const int64_t rows = checked_product(op, "partitioned rows (B * padded height * padded width)",
                                       checked_product(op, "B * padded height", B, Hp), Wp);
  checked_product(op, "partitioned elements (rows * channels)", rows, C);
  return g;
}

// The problem of a forward (or backward) call, or a clear error naming the argument.
inline WindowAttentionProblem check_window_attention_args(const char* op, const at::Tensor& qkv,
                                                          const at::Tensor& table,
                                                          const std::optional<at::Tensor>& qkv_bias,
                                                          at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                          int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 4, op, ": qkv must be (B, H, W, 3 * num_heads * head_dim), got ", qkv.sizes());
  TORCH_CHECK(at::isFloatingType(qkv.scalar_type()), op, ": qkv must be a floating tensor, got ", qkv.scalar_type());
  TORCH_CHECK(num_heads > 0 && qkv.size(3) > 0 && qkv.size(3) % num_heads == 0 && (qkv.size(3) / num_heads) % 3 == 0, op,
              ": qkv.size(3) = ", qkv.size(3), " is not 3 * num_heads * head_dim with head_dim > 0 for num_heads = ",
              num_heads);
  WindowAttentionProblem p;
  p.g = checked_window_geometry(op, qkv.size(0), qkv.size(1), qkv.size(2), qkv.size(3), window_size, shift_size);
  p.N = p.g.tokens_per_window();
  p.nH = num_heads;
  p.hd = qkv.size(3) / (3 * num_heads);
  p.C = num_heads * p.hd;
  // The kernels hold (nH, N, N) bias rows and per-window N x N scratch: those sizes must fit too.
  checked_product(op, "bias rows (num_heads * N * N)", checked_product(op, "N * N", p.N, p.N), p.nH);
  const int64_t table_rows = checked_product(op, "relative_position_bias_table rows", 2 * p.g.wh - 1, 2 * p.g.ww - 1);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == table_rows && table.size(1) == num_heads, op,
              ": relative_position_bias_table must be (", table_rows, ", ", num_heads, "), got ", table.sizes());
  TORCH_CHECK(at::isFloatingType(table.scalar_type()), op, ": relative_position_bias_table must be a floating tensor, got ",
              table.scalar_type());
  if (qkv_bias.has_value()) {
    TORCH_CHECK(qkv_bias->dim() == 1 && qkv_bias->size(0) == 3 * p.C, op, ": qkv_bias must be (", 3 * p.C,
                "), got ", qkv_bias->sizes());
    TORCH_CHECK(at::isFloatingType(qkv_bias->scalar_type()), op, ": qkv_bias must be a floating tensor, got ",
                qkv_bias->scalar_type());
  }
  check_same_device(op, qkv, table, "relative_position_bias_table");
  if (qkv_bias.has_value()) check_same_device(op, qkv, *qkv_bias, "qkv_bias");
  return p;
}

// The kernels' compute type, which is also the log-sum-exp's dtype: float, double for double.
inline at::ScalarType window_attention_acc_type(const at::Tensor& qkv) {
  return qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The backward's extra inputs: grad_out and out of the output's shape, the forward's log-sum-exp.
inline void check_window_attention_backward_args(const char* op, const WindowAttentionProblem& p,
                                                 const at::Tensor& qkv, const at::Tensor& grad_out,
                                                 const at::Tensor& out, const std::optional<at::Tensor>& lse) {
  const std::vector<int64_t> shape = p.out_shape();
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape) && out.sizes() == at::IntArrayRef(shape), op,
              ": grad_out and out must be ", at::IntArrayRef(shape), ", got ", grad_out.sizes(), " and ", out.sizes());
  check_same_device(op, qkv, grad_out, "grad_out");
  check_same_device(op, qkv, out, "out");
  if (!lse.has_value()) return;  // the caller checks the softmax state it was given instead
  const auto acc = window_attention_acc_type(qkv);
  TORCH_CHECK(lse->numel() == p.windows() * p.nH * p.N && lse->scalar_type() == acc, op,
              ": lse must be the forward's (B * nW, nH, N) ", acc, " log-sum-exp");
  check_same_device(op, qkv, *lse, "lse");
}

// What a padded token's q, k, v are: the qkv bias in qkv's dtype, or zeros.
inline at::Tensor window_attention_pad_row(const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias) {
  return qkv_bias.has_value() ? qkv_bias->to(qkv.scalar_type()).contiguous() : at::zeros({qkv.size(-1)}, qkv.options());
}

}  // namespace vitkernels
