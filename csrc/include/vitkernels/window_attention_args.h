// Argument checks and shared host-side helpers of the window attention ops, used by both torch bindings
// (csrc/cpu/window_attention.cpp, csrc/cuda/window_attention.cu) so the two refuse the same calls with the same
// messages. Needs ATen (unlike window_geometry.h, which the runtime-only CUDA headers include).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

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
};

inline void check_same_device(const char* op, const at::Tensor& qkv, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == qkv.device(), op, ": ", name, " must be on qkv's device ", qkv.device(), ", got ",
              t.device());
}

// The problem of a forward (or backward) call, or a clear error naming the argument.
inline WindowAttentionProblem check_window_attention_args(const char* op, const at::Tensor& qkv,
                                                          const at::Tensor& table,
                                                          const std::optional<at::Tensor>& qkv_bias,
                                                          at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                          int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 4, op, ": qkv must be (B, H, W, 3 * num_heads * head_dim), got ", qkv.sizes());
  TORCH_CHECK(at::isFloatingType(qkv.scalar_type()), op, ": qkv must be a floating tensor, got ", qkv.scalar_type());
  TORCH_CHECK(window_size.size() == 2 && shift_size.size() == 2, op, ": window_size and shift_size must be pairs");
  TORCH_CHECK(window_size[0] > 0 && window_size[1] > 0, op, ": window_size must be positive, got ", window_size);
  TORCH_CHECK(shift_size[0] >= 0 && shift_size[0] < window_size[0] && shift_size[1] >= 0 &&
                  shift_size[1] < window_size[1],
              op, ": shift_size must satisfy 0 <= shift < window_size, got ", shift_size);
  TORCH_CHECK(num_heads > 0 && qkv.size(3) % (3 * num_heads) == 0, op, ": qkv.size(3) = ", qkv.size(3),
              " is not 3 * num_heads * head_dim for num_heads = ", num_heads);
  TORCH_CHECK(qkv.size(1) > 0 && qkv.size(2) > 0, op, ": empty image ", qkv.sizes());
  WindowAttentionProblem p;
  p.g = WindowGeometry::make(qkv.size(0), qkv.size(1), qkv.size(2), window_size[0], window_size[1], shift_size[0],
                             shift_size[1]);
  p.N = p.g.tokens_per_window();
  p.nH = num_heads;
  p.hd = qkv.size(3) / (3 * num_heads);
  p.C = num_heads * p.hd;
  const int64_t table_rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == table_rows && table.size(1) == num_heads, op,
              ": relative_position_bias_table must be (", table_rows, ", ", num_heads, "), got ", table.sizes());
  TORCH_CHECK(!qkv_bias.has_value() || (qkv_bias->dim() == 1 && qkv_bias->size(0) == 3 * p.C), op,
              ": qkv_bias must be (", 3 * p.C, "), got ", qkv_bias->sizes());
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
                                                 const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> shape = p.out_shape();
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape) && out.sizes() == at::IntArrayRef(shape), op,
              ": grad_out and out must be ", at::IntArrayRef(shape), ", got ", grad_out.sizes(), " and ", out.sizes());
  const auto acc = window_attention_acc_type(qkv);
  TORCH_CHECK(lse.numel() == p.windows() * p.nH * p.N && lse.scalar_type() == acc, op,
              ": lse must be the forward's (B * nW, nH, N) ", acc, " log-sum-exp");
  check_same_device(op, qkv, grad_out, "grad_out");
  check_same_device(op, qkv, out, "out");
  check_same_device(op, qkv, lse, "lse");
}

// What a padded token's q, k, v are: the qkv bias in qkv's dtype, or zeros.
inline at::Tensor window_attention_pad_row(const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias) {
  return qkv_bias.has_value() ? qkv_bias->to(qkv.scalar_type()).contiguous() : at::zeros({qkv.size(3)}, qkv.options());
}

}  // namespace vitkernels
