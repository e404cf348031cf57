// Post-norm residual seam on CPU, fused (semantics: vitkernels/reference/bias_layernorm_residual.py): in a Swin V2
// (res-post-norm) block, x + drop_path(norm(linear(h))), the Linear runs as a plain GEMM and this op adds its bias,
// normalises the row and adds the residual, reading each row once. The backward recomputes x1 = y + bias per row (it
// saves no copy of x1), and sums the bias and LayerNorm parameter gradients on the way; the residual's gradient is
// the output's (the caller's, no kernel).
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "row_ops.h"

#define VK_CPU_BODY "bias_layernorm_residual_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY

namespace vitkernels {
namespace cpu {
namespace {

// out (may be yc itself), contiguous of the compute type, from contiguous yc and rc of that type; mean, rstd (rows).
void forward_into(const at::Tensor& yc, const std::optional<at::Tensor>& bias, const at::Tensor& rc,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& ln_bias, double eps, at::Tensor& out, at::Tensor& mean,
                  at::Tensor& rstd) {
  const int64_t C = yc.size(-1), rows = C == 0 ? 0 : yc.numel() / C;
  if (rows == 0) return;
  const int64_t rows_per_sample = rows / yc.size(0);
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "vitkernels_bias_layernorm_residual_cpu", [&] {
    const at::ScalarType type = yc.scalar_type();
    at::Tensor b, s, w, lb;
    const scalar_t* b_ptr = optional_data<scalar_t>(bias, type, b);
    const scalar_t* s_ptr = optional_data<scalar_t>(scale, type, s);
    const scalar_t* w_ptr = optional_data<scalar_t>(weight, type, w);
    const scalar_t* lb_ptr = optional_data<scalar_t>(ln_bias, type, lb);
    const scalar_t* y_ptr = yc.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = rc.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    scalar_t* m_ptr = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rs_ptr = rstd.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
      VK_CPU_CALL(isa, bias_layernorm_residual_rows, y_ptr, b_ptr, r_ptr, s_ptr, rows_per_sample, w_ptr, lb_ptr, e,
                  o_ptr, m_ptr, rs_ptr, begin, end, C);
    });
  });
}

}  // namespace

// out = residual + scale[sample] * (LayerNorm(y + bias) * weight + ln_bias) -> (out, mean, rstd). Float and double
// run as they are; other floating types through a float copy, rounded back.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_layernorm_residual_cpu(
    const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& ln_bias, double eps) {
  check_bias_residual_args("bias_layernorm_residual", y, bias, residual, scale);
  check_layernorm_args("bias_layernorm_residual", y, weight, ln_bias);
  const at::ScalarType type = row_op_compute_type(y);
  auto [mean, rstd] = row_statistics(y, type);
  const at::Tensor yc = as_compute(y, type), rc = as_compute(residual, type);
  at::Tensor out = at::empty_like(yc, at::MemoryFormat::Contiguous);
  forward_into(yc, bias, rc, scale, weight, ln_bias, eps, out, mean, rstd);
  return {out.to(y.scalar_type()), mean, rstd};
}

// In place, for inference: y = residual + scale (LayerNorm(y + bias) * weight + ln_bias).
void bias_layernorm_residual_inplace_cpu(at::Tensor& y, const std::optional<at::Tensor>& bias,
                                         const at::Tensor& residual, const std::optional<at::Tensor>& scale,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& ln_bias, double eps) {
  check_bias_residual_args("bias_layernorm_residual_", y, bias, residual, scale);
  check_layernorm_args("bias_layernorm_residual_", y, weight, ln_bias);
  const at::ScalarType type = row_op_compute_type(y);
  auto [mean, rstd] = row_statistics(y, type);
  // A row's residual is read after its normalised values are written: a residual sharing y's memory is read from
  // a copy (so is any parameter that does: LayerNorm's weight a view of y would be one).
  at::Tensor rc = as_compute(residual, type);
  if (at::get_overlap_status(rc, y) != at::MemOverlapStatus::No) rc = rc.clone();
  std::optional<at::Tensor> b = bias, s = scale, w = weight, lb = ln_bias;
  for (std::optional<at::Tensor>* t : {&b, &s, &w, &lb}) {
    if (t->has_value() && at::get_overlap_status(**t, y) != at::MemOverlapStatus::No) *t = (*t)->clone();
  }
  const bool direct = y.is_contiguous() && y.scalar_type() == type;
  at::Tensor o = direct ? y : as_compute(y, type).clone();
  forward_into(o, b, rc, s, w, lb, eps, o, mean, rstd);
  if (!direct) y.copy_(o);
}

// -> (grad_y, grad_bias, grad_weight, grad_ln_bias); the residual's gradient is grad_out itself.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_layernorm_residual_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& scale) {
  const char* op = "bias_layernorm_residual_backward";
  TORCH_CHECK(y.dim() >= 2 && at::isFloatingType(y.scalar_type()), op, ": y must be a floating (N, ..., C) tensor");
  TORCH_CHECK(grad_out.sizes() == y.sizes() && at::isFloatingType(grad_out.scalar_type()), op,
              ": grad_out must be a floating ", y.sizes(), " tensor, got ", grad_out.sizes());
  const int64_t C = y.size(-1), rows = C == 0 ? 0 : y.numel() / C;  // the rows the kernels run on
  const int64_t stat_rows = c10::multiply_integers(y.sizes().slice(0, y.dim() - 1));  // of width 0 too
  const at::ScalarType type = row_op_compute_type(y);
  TORCH_CHECK(mean.numel() == stat_rows && rstd.numel() == stat_rows && mean.scalar_type() == type &&
                  rstd.scalar_type() == type,
              op, ": mean and rstd must be the forward's (", stat_rows, ") ", type, " row statistics");
  check_layernorm_args(op, y, weight, std::nullopt);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && at::isFloatingType(bias->scalar_type()), op,
                ": bias must be a floating (", C, ") tensor, got ", bias->sizes());
  }
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == y.size(0) && at::isFloatingType(scale->scalar_type()), op,
                ": scale must hold one value per sample");
  }
  const at::Tensor bias_in = bias.has_value() ? *bias : at::Tensor();
  const at::Tensor scale_in = scale.has_value() ? *scale : at::Tensor();
  for (const at::Tensor* t : {&grad_out, &mean, &rstd, &bias_in, &scale_in}) {
    TORCH_CHECK(!t->defined() || t->device() == y.device(), op, ": every tensor must be on y's device");
  }
  // the parameter gradients' dtype: the LayerNorm weight's, else y's; the bias gradient: the bias's, else y's
  const at::ScalarType param_type = weight.has_value() ? weight->scalar_type() : y.scalar_type();
  const at::ScalarType bias_type = bias.has_value() ? bias->scalar_type() : y.scalar_type();
  const at::Tensor go = as_compute(grad_out, type), yc = as_compute(y, type);
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor d_y = at::empty_like(yc, at::MemoryFormat::Contiguous);
  const Isa isa = selected_isa();
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES(type, "vitkernels_bias_layernorm_residual_backward_cpu", [&] {
    at::Tensor b, w, s;
    const scalar_t* b_ptr = optional_data<scalar_t>(bias, type, b);
    const scalar_t* w_ptr = optional_data<scalar_t>(weight, type, w);
    const scalar_t* s_ptr = optional_data<scalar_t>(scale, type, s);
    const scalar_t* go_ptr = go.const_data_ptr<scalar_t>();
    const scalar_t* y_ptr = yc.const_data_ptr<scalar_t>();
    const scalar_t* m_ptr = mc.const_data_ptr<scalar_t>();
    const scalar_t* rs_ptr = rc.const_data_ptr<scalar_t>();
    scalar_t* dy_ptr = d_y.mutable_data_ptr<scalar_t>();
    const int64_t rows_per_sample = rows == 0 ? 1 : rows / y.size(0);
    sums = parallel_rows_with_column_sums<scalar_t>(rows, C, 3, [&](int64_t begin, int64_t end, scalar_t* acc) {
      std::vector<scalar_t> scratch(2 * C);  // the row's x1 and scaled gradient
      VK_CPU_CALL(isa, bias_layernorm_residual_backward_rows, go_ptr, y_ptr, b_ptr, m_ptr, rs_ptr, w_ptr, s_ptr,
                  rows_per_sample, dy_ptr, scratch.data(), acc, begin, end, C);
    });
  });
  return {d_y.to(y.scalar_type()), column_sums_tensor(sums, 0, C, y, bias_type),
          column_sums_tensor(sums, 1, C, y, param_type), column_sums_tensor(sums, 2, C, y, param_type)};
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("bias_layernorm_residual", &bias_layernorm_residual_cpu);
  m.impl("bias_layernorm_residual_", &bias_layernorm_residual_inplace_cpu);
  m.impl("bias_layernorm_residual_backward", &bias_layernorm_residual_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
