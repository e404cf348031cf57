// Bias + (drop-path scaled) residual add + LayerNorm on CPU, fused (semantics:
// vitkernels/reference/bias_residual_layernorm.py): in a transformer block, the attention branch's output Linear runs
// as a plain GEMM, and this op adds its bias and the residual, keeps the sum (the MLP branch's residual) and
// normalises it for the MLP, reading each row once. The backward adds the residual path's gradient into the
// LayerNorm's input gradient in the same pass and sums the bias and LayerNorm parameter gradients on the way.
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "eager_autograd.h"
#include "row_ops.h"

#define VK_CPU_BODY "bias_residual_layernorm_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY
#include "row_ops_bf16.h"

namespace vitkernels {
namespace cpu {
namespace {

// x1 (may be yc) and out, contiguous of the compute type; mean, rstd (rows) of the compute type.
void forward_into(const at::Tensor& yc, const std::optional<at::Tensor>& bias, const at::Tensor& rc,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& ln_bias, double eps, at::Tensor& x1, at::Tensor& out,
                  at::Tensor& mean, at::Tensor& rstd) {
  const int64_t C = yc.size(-1), rows = C == 0 ? 0 : yc.numel() / C;
  if (rows == 0) return;
  const int64_t rows_per_sample = rows / yc.size(0);
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "vitkernels_bias_residual_layernorm_cpu", [&] {
    const at::ScalarType type = yc.scalar_type();
    at::Tensor b, s, w, lb;
    const scalar_t* b_ptr = optional_data<scalar_t>(bias, type, b);
    const scalar_t* s_ptr = optional_data<scalar_t>(scale, type, s);
    const scalar_t* w_ptr = optional_data<scalar_t>(weight, type, w);
    const scalar_t* lb_ptr = optional_data<scalar_t>(ln_bias, type, lb);
    const scalar_t* y_ptr = yc.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = rc.const_data_ptr<scalar_t>();
    scalar_t* x1_ptr = x1.mutable_data_ptr<scalar_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    scalar_t* m_ptr = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rs_ptr = rstd.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
      VK_CPU_CALL(isa, bias_residual_layernorm_rows, y_ptr, b_ptr, r_ptr, s_ptr, rows_per_sample, w_ptr, lb_ptr, e,
                  x1_ptr, o_ptr, m_ptr, rs_ptr, begin, end, C);
    });
  });
}

// x1 (may be y itself) and out, contiguous bfloat16, from a contiguous bfloat16 y, chunk by chunk through float
// scratch (row_ops_bf16.h); mean, rstd: float (rows).
void bf16_forward_into(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& ln_bias, double eps, at::Tensor& x1, at::Tensor& out,
                       at::Tensor& mean, at::Tensor& rstd) {
  const int64_t C = y.size(-1), rows = C == 0 ? 0 : y.numel() / C;
  const Isa isa = selected_isa();
  const at::Tensor rc = residual.contiguous();
  std::vector<float> b, s, w, lb;
  at::Tensor bt, st, wt, lbt;
  const float* b_ptr = optional_float_data(isa, bias, b, bt);
  const float* s_ptr = optional_float_data(isa, scale, s, st);
  const float* w_ptr = optional_float_data(isa, weight, w, wt);
  const float* lb_ptr = optional_float_data(isa, ln_bias, lb, lbt);
  float* m_ptr = mean.mutable_data_ptr<float>();
  float* rs_ptr = rstd.mutable_data_ptr<float>();
  const float e = static_cast<float>(eps);
  bf16_rows_via_float<2, 2>(
      isa, rows, C, y.size(0), {y.const_data_ptr<at::BFloat16>(), rc.const_data_ptr<at::BFloat16>()},
      {x1.mutable_data_ptr<at::BFloat16>(), out.mutable_data_ptr<at::BFloat16>()},
      [&](const auto& in, const auto& o, int64_t first, int64_t n, int64_t sample) {
        // the chunk lies in one sample: its scale is one value, and n rows per "sample" index it for every row
        const float* s_chunk = s_ptr ? s_ptr + sample : nullptr;
        VK_CPU_CALL(isa, bias_residual_layernorm_rows, in[0], b_ptr, in[1], s_chunk, n, w_ptr, lb_ptr, e, o[0], o[1],
                    m_ptr + first, rs_ptr + first, int64_t{0}, n, C);
      });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_residual_layernorm_cpu(
    const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& ln_bias, double eps) {
  check_bias_residual_args("bias_residual_layernorm", y, bias, residual, scale);
  check_layernorm_args("bias_residual_layernorm", y, weight, ln_bias);
  const at::ScalarType type = row_op_compute_type(y);
  auto [mean, rstd] = row_statistics(y, type);
  if (y.scalar_type() == at::kBFloat16) {  // chunk by chunk through float scratch (row_ops_bf16.h)
    const at::Tensor yc = y.contiguous();
    at::Tensor x1 = at::empty_like(yc, at::MemoryFormat::Contiguous);
    at::Tensor out = at::empty_like(yc, at::MemoryFormat::Contiguous);
    bf16_forward_into(yc, bias, residual, scale, weight, ln_bias, eps, x1, out, mean, rstd);
    return {x1, out, mean, rstd};
  }
  const at::Tensor yc = as_compute(y, type), rc = as_compute(residual, type);
  at::Tensor x1 = at::empty_like(yc, at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty_like(yc, at::MemoryFormat::Contiguous);
  forward_into(yc, bias, rc, scale, weight, ln_bias, eps, x1, out, mean, rstd);
  return {x1.to(y.scalar_type()), out.to(y.scalar_type()), mean, rstd};
}

// In place, for inference: y = residual + scale (y + bias), out = LayerNorm(y) (out: y's shape, dtype, contiguous).
void bias_residual_layernorm_inplace_cpu(at::Tensor& y, const std::optional<at::Tensor>& bias,
                                         const at::Tensor& residual, const std::optional<at::Tensor>& scale,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& ln_bias, double eps, at::Tensor& out) {
  check_bias_residual_args("bias_residual_layernorm_", y, bias, residual, scale);
  check_layernorm_args("bias_residual_layernorm_", y, weight, ln_bias);
  TORCH_CHECK(out.sizes() == y.sizes() && out.scalar_type() == y.scalar_type() && out.device() == y.device(),
              "bias_residual_layernorm_: out must be like y");
  const at::ScalarType type = row_op_compute_type(y);
  auto [mean, rstd] = row_statistics(y, type);
  if (y.is_contiguous() && out.is_contiguous() && y.scalar_type() == at::kBFloat16) {  // through float scratch
    bf16_forward_into(y, bias, residual, scale, weight, ln_bias, eps, y, out, mean, rstd);
    return;
  }
  const at::Tensor rc = as_compute(residual, type);
  const bool direct = y.is_contiguous() && out.is_contiguous() && y.scalar_type() == type;
  at::Tensor x1 = direct ? y : as_compute(y, type).clone();
  at::Tensor o = direct ? out : at::empty_like(x1, at::MemoryFormat::Contiguous);
  forward_into(x1, bias, rc, scale, weight, ln_bias, eps, x1, o, mean, rstd);
  if (!direct) {
    y.copy_(x1);
    out.copy_(o);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_residual_layernorm_backward_cpu(
    const std::optional<at::Tensor>& grad_x1, const at::Tensor& grad_out, const at::Tensor& x1,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& scale) {
  const char* op = "bias_residual_layernorm_backward";
  TORCH_CHECK(x1.dim() >= 2 && at::isFloatingType(x1.scalar_type()), op, ": x1 must be a floating (N, ..., C) tensor");
  TORCH_CHECK(grad_out.sizes() == x1.sizes(), op, ": grad_out must be ", x1.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(!grad_x1.has_value() || grad_x1->sizes() == x1.sizes(), op, ": grad_x1 must be ", x1.sizes());
  const int64_t C = x1.size(-1), rows = C == 0 ? 0 : x1.numel() / C;  // the rows the kernels run on
  const int64_t stat_rows = c10::multiply_integers(x1.sizes().slice(0, x1.dim() - 1));  // of width 0 too
  const at::ScalarType type = row_op_compute_type(x1);
  TORCH_CHECK(mean.numel() == stat_rows && rstd.numel() == stat_rows && mean.scalar_type() == type &&
                  rstd.scalar_type() == type,
              op, ": mean and rstd must be the forward's (", stat_rows, ") ", type, " row statistics");
  check_layernorm_args(op, x1, weight, std::nullopt);
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == x1.size(0) && at::isFloatingType(scale->scalar_type()), op,
                ": scale must hold one value per sample");
  }
  // the parameter gradients' dtype: the LayerNorm weight's, else x1's
  const at::ScalarType param_type = weight.has_value() ? weight->scalar_type() : x1.scalar_type();
  const at::Tensor gx1_in = grad_x1.has_value() ? *grad_x1 : at::Tensor();
  const at::Tensor scale_in = scale.has_value() ? *scale : at::Tensor();
  for (const at::Tensor* t : {&grad_out, &mean, &rstd, &gx1_in, &scale_in}) {
    TORCH_CHECK(!t->defined() || t->device() == x1.device(), op, ": every tensor must be on x1's device");
  }
  if (all_bfloat16({&grad_out, &x1, &gx1_in})) {  // chunk by chunk through float scratch (row_ops_bf16.h)
    const at::Tensor go = grad_out.contiguous(), xc = x1.contiguous();
    const at::Tensor gx1 = gx1_in.defined() ? gx1_in.contiguous() : at::Tensor();
    const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
    at::Tensor d_res = at::empty_like(xc, at::MemoryFormat::Contiguous);
    at::Tensor d_y =
        scale.has_value() ? at::empty_like(xc, at::MemoryFormat::Contiguous) : at::empty({0}, xc.options());
    const Isa isa = selected_isa();
    std::vector<float> w, s;
    at::Tensor wt, st;
    const float* w_ptr = optional_float_data(isa, weight, w, wt);
    const float* s_ptr = optional_float_data(isa, scale, s, st);
    const float* m_ptr = mc.const_data_ptr<float>();
    const float* rs_ptr = rc.const_data_ptr<float>();
    const std::vector<double> sums = bf16_rows_via_float_with_column_sums<3, 2>(
        isa, rows, C, x1.size(0), /*sums=*/3,
        {go.const_data_ptr<at::BFloat16>(), gx1.defined() ? gx1.const_data_ptr<at::BFloat16>() : nullptr,
         xc.const_data_ptr<at::BFloat16>()},
        {d_res.mutable_data_ptr<at::BFloat16>(), s_ptr ? d_y.mutable_data_ptr<at::BFloat16>() : nullptr},
        [&](const auto& in, const auto& o, int64_t first, int64_t n, int64_t sample, float* acc) {
          // one sample per chunk: its scale is one value, and n rows per "sample" index it for every row
          VK_CPU_CALL(isa, bias_residual_layernorm_backward_rows, in[0], in[1], in[2], m_ptr + first, rs_ptr + first,
                      w_ptr, s_ptr ? s_ptr + sample : nullptr, n, o[0], o[1], acc, int64_t{0}, n, C);
        });
    return {d_res, d_y, column_sums_tensor(sums, 0, C, x1, param_type),
            column_sums_tensor(sums, 1, C, x1, param_type), column_sums_tensor(sums, 2, C, x1, param_type)};
  }
  const at::Tensor go = as_compute(grad_out, type), xc = as_compute(x1, type);
  const at::Tensor gx1 = grad_x1.has_value() ? as_compute(*grad_x1, type) : at::Tensor();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor d_res = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor d_y = scale.has_value() ? at::empty_like(xc, at::MemoryFormat::Contiguous) : at::empty({0}, xc.options());
  const Isa isa = selected_isa();
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES(type, "vitkernels_bias_residual_layernorm_backward_cpu", [&] {
    const at::Tensor w = weight.has_value() ? as_compute(*weight, type) : at::Tensor();
    const at::Tensor s = scale.has_value() ? as_compute(*scale, type) : at::Tensor();
    const scalar_t* go_ptr = go.const_data_ptr<scalar_t>();
    const scalar_t* gx1_ptr = gx1.defined() ? gx1.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
    const scalar_t* m_ptr = mc.const_data_ptr<scalar_t>();
    const scalar_t* rs_ptr = rc.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* s_ptr = s.defined() ? s.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dres_ptr = d_res.mutable_data_ptr<scalar_t>();
    scalar_t* dy_ptr = s.defined() ? d_y.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t rows_per_sample = rows == 0 ? 1 : rows / x1.size(0);
    sums = parallel_rows_with_column_sums<scalar_t>(rows, C, 3, [&](int64_t begin, int64_t end, scalar_t* acc) {
      VK_CPU_CALL(isa, bias_residual_layernorm_backward_rows, go_ptr, gx1_ptr, x_ptr, m_ptr, rs_ptr, w_ptr, s_ptr,
                  rows_per_sample, dres_ptr, dy_ptr, acc, begin, end, C);
    });
  });
  return {d_res.to(x1.scalar_type()), d_y.to(x1.scalar_type()), column_sums_tensor(sums, 0, C, x1, param_type),
          column_sums_tensor(sums, 1, C, x1, param_type), column_sums_tensor(sums, 2, C, x1, param_type)};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops through the dispatcher (so that dispatch modes, fake tensors and other devices see the op itself), called
// below autograd by the callers below except where a graph must be recorded.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& ln_bias, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitkernels::bias_residual_layernorm", "")
                             .typed<decltype(bias_residual_layernorm_cpu)>();
  return op.call(y, bias, residual, scale, weight, ln_bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const std::optional<at::Tensor>& grad_x1, const at::Tensor& grad_out, const at::Tensor& x1, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitkernels::bias_residual_layernorm_backward", "")
                             .typed<decltype(bias_residual_layernorm_backward_cpu)>();
  return op.call(grad_x1, grad_out, x1, mean, rstd, weight, scale);
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The op's forward and backward as a C++ autograd Function: bias_residual_layernorm_eager's training path, the same
// kernels and the same gradients as the op's registered (Python) autograd, without its ~0.2 ms of Python per call
// (forward + backward; 20 calls in a Swin-T training step).
struct EagerBiasResidualLayerNorm : public torch::autograd::Function<EagerBiasResidualLayerNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const std::optional<at::Tensor>& bias,
                               const at::Tensor& residual, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& ln_bias,
                               double eps) {
    // (Function::apply runs this below autograd)
    auto [x1, out, mean, rstd] = forward_op(y, bias, residual, scale, weight, ln_bias, eps);
    // x1, mean and rstd are this Function's own; weight and scale inputs (version-checked), undefined where absent
    ctx->save_for_backward({x1, mean, rstd, weight.value_or(at::Tensor()), scale.value_or(at::Tensor())});
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["scale"] = scale.has_value();
    ctx->saved_data["weight"] = weight.has_value();
    ctx->saved_data["ln_bias"] = ln_bias.has_value();
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    if (ln_bias.has_value()) ctx->saved_data["ln_bias_dtype"] = ln_bias->scalar_type();
    return {x1, out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x1 = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3], &scale = saved[4];
    const bool has_bias = ctx->saved_data["bias"].toBool(), has_scale = ctx->saved_data["scale"].toBool();
    const bool has_weight = ctx->saved_data["weight"].toBool(), has_ln_bias = ctx->saved_data["ln_bias"].toBool();
    const at::Tensor grad_out = grads[1].defined() ? grads[1] : at::zeros_like(x1);
    const std::optional<at::Tensor> grad_x1 = defined_or_none(grads[0]);
    const BelowAutogradUnlessCreatingGraph below;
    auto [grad_res, grad_y, grad_bias, grad_weight, grad_ln_bias] =
        backward_op(grad_x1, grad_out, x1, mean, rstd, defined_or_none(weight), defined_or_none(scale));
    if (!has_scale) grad_y = grad_res;
    // needs_input_grad counts the tensor inputs given (an absent optional has no edge); the returned list has an
    // entry for every argument
    int64_t edge = 0;
    auto needs = [&](bool present) { return present && ctx->needs_input_grad(edge++); };
    const bool need_y = needs(true), need_bias = needs(has_bias), need_res = needs(true);
    needs(has_scale);  // the drop-path factors get no gradient (the op's backward gives none)
    const bool need_weight = needs(has_weight), need_ln_bias = needs(has_ln_bias);
    return {need_y ? grad_y : at::Tensor(),
            need_bias ? grad_bias.to(ctx->saved_data["bias_dtype"].toScalarType()) : at::Tensor(),
            need_res ? grad_res : at::Tensor(),
            at::Tensor(),
            need_weight ? grad_weight.to(weight.scalar_type()) : at::Tensor(),
            need_ln_bias ? grad_ln_bias.to(ctx->saved_data["ln_bias_dtype"].toScalarType()) : at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

// (x1, LayerNorm(x1)) of vitkernels::bias_residual_layernorm, recorded for autograd by EagerBiasResidualLayerNorm
// where autograd is recording, else the op's forward alone (below autograd): the fused blocks' eager training path
// on CPU (torch.compile traces the op and its registered autograd instead, vitkernels/ops/bias_residual_layernorm.py).
std::tuple<at::Tensor, at::Tensor> bias_residual_layernorm_eager(
    const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& ln_bias, double eps) {
  if (!records_autograd(y, bias, residual, scale, weight, ln_bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [x1, out, mean, rstd] = forward_op(y, bias, residual, scale, weight, ln_bias, eps);
    return {x1, out};
  }
  const variable_list outs = EagerBiasResidualLayerNorm::apply(y, bias, residual, scale, weight, ln_bias, eps);
  return {outs[0], outs[1]};
}

TORCH_LIBRARY_IMPL(vitkernels, CompositeImplicitAutograd, m) {
  m.impl("bias_residual_layernorm_eager", &bias_residual_layernorm_eager);
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("bias_residual_layernorm", &bias_residual_layernorm_cpu);
  m.impl("bias_residual_layernorm_", &bias_residual_layernorm_inplace_cpu);
  m.impl("bias_residual_layernorm_backward", &bias_residual_layernorm_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
