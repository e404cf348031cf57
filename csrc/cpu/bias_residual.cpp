// Bias + (drop-path scaled) residual add on CPU, fused (semantics: vitkernels/reference/bias_residual.py): a block's
// last Linear runs as a plain GEMM and this op adds its bias, the per-sample drop-path scale and the residual in one
// pass. The backward is plain tensor arithmetic (vitkernels/ops/bias_residual.py).
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "eager_autograd.h"
#include "row_ops.h"

#define VK_CPU_BODY "bias_residual_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY
#include "row_ops_bf16.h"

namespace vitkernels {
namespace cpu {

namespace {

void forward_into(const at::Tensor& yc, const std::optional<at::Tensor>& bias, const at::Tensor& rc,
                  const std::optional<at::Tensor>& scale, at::Tensor& out) {
  const int64_t C = yc.size(-1), rows = C == 0 ? 0 : yc.numel() / C;
  if (rows == 0) return;
  const int64_t rows_per_sample = rows / yc.size(0);
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "vitkernels_bias_residual_cpu", [&] {
    at::Tensor b, s;
    const scalar_t* b_ptr = optional_data<scalar_t>(bias, yc.scalar_type(), b);
    const scalar_t* s_ptr = optional_data<scalar_t>(scale, yc.scalar_type(), s);
    const scalar_t* y_ptr = yc.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = rc.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
      VK_CPU_CALL(isa, bias_residual_rows, y_ptr, b_ptr, r_ptr, s_ptr, rows_per_sample, o_ptr, begin, end, C);
    });
  });
}

// out (contiguous bfloat16, may be y itself) = residual + scale (y + bias) for a contiguous bfloat16 y, chunk by
// chunk through float scratch (row_ops_bf16.h).
void bf16_forward_into(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                       const std::optional<at::Tensor>& scale, at::Tensor& out) {
  const int64_t C = y.size(-1), rows = C == 0 ? 0 : y.numel() / C;
  const Isa isa = selected_isa();
  const at::Tensor rc = residual.contiguous();
  std::vector<float> b, s;
  at::Tensor bt, st;
  const float* b_ptr = optional_float_data(isa, bias, b, bt);
  const float* s_ptr = optional_float_data(isa, scale, s, st);
  bf16_rows_via_float<2, 1>(
      isa, rows, C, y.size(0), {y.const_data_ptr<at::BFloat16>(), rc.const_data_ptr<at::BFloat16>()},
      {out.mutable_data_ptr<at::BFloat16>()},
      [&](const auto& in, const auto& o, int64_t, int64_t n, int64_t sample) {
        // the chunk lies in one sample: its scale is one value, and n rows per "sample" index it for every row
        const float* s_chunk = s_ptr ? s_ptr + sample : nullptr;
        VK_CPU_CALL(isa, bias_residual_rows, in[0], b_ptr, in[1], s_chunk, n, o[0], int64_t{0}, n, C);
      });
}

}  // namespace

at::Tensor bias_residual_cpu(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                             const std::optional<at::Tensor>& scale) {
  check_bias_residual_args("bias_residual", y, bias, residual, scale);
  if (y.scalar_type() == at::kBFloat16) {  // chunk by chunk through float scratch (row_ops_bf16.h)
    const at::Tensor yc = y.contiguous();
    at::Tensor out = at::empty_like(yc, at::MemoryFormat::Contiguous);
    bf16_forward_into(yc, bias, residual, scale, out);
    return out;
  }
  const at::ScalarType type = row_op_compute_type(y);
  const at::Tensor yc = as_compute(y, type), rc = as_compute(residual, type);
  at::Tensor out = at::empty_like(yc, at::MemoryFormat::Contiguous);
  forward_into(yc, bias, rc, scale, out);
  return out.to(y.scalar_type());
}

// In place, for inference: y = residual + scale (y + bias).
void bias_residual_inplace_cpu(at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                               const std::optional<at::Tensor>& scale) {
  check_bias_residual_args("bias_residual_", y, bias, residual, scale);
  const at::ScalarType type = row_op_compute_type(y);
  if (y.is_contiguous() && y.scalar_type() == at::kBFloat16) {  // chunk by chunk through float scratch
    bf16_forward_into(y, bias, residual, scale, y);
    return;
  }
  const at::Tensor rc = as_compute(residual, type);
  if (y.is_contiguous() && y.scalar_type() == type) {
    forward_into(y, bias, rc, scale, y);
  } else {
    at::Tensor yc = as_compute(y, type).clone();
    forward_into(yc, bias, rc, scale, yc);
    y.copy_(yc);
  }
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// vitkernels::bias_residual through the dispatcher (dispatch modes, fake tensors and other devices see the op).
at::Tensor forward_op(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                      const std::optional<at::Tensor>& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitkernels::bias_residual", "")
                             .typed<decltype(bias_residual_cpu)>();
  return op.call(y, bias, residual, scale);
}

// The op and its gradient as a C++ autograd Function: bias_residual_eager's training path, the gradient formula of
// the op's registered (Python) autograd (vitkernels/ops/bias_residual.py) in ATen ops (differentiable: a second-order
// gradient goes through them), without its ~0.1-0.2 ms of Python per call.
struct EagerBiasResidual : public torch::autograd::Function<EagerBiasResidual> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const std::optional<at::Tensor>& bias,
                            const at::Tensor& residual, const std::optional<at::Tensor>& scale) {
    ctx->save_for_backward({scale.value_or(at::Tensor())});
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["scale"] = scale.has_value();
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return forward_op(y, bias, residual, scale);  // (Function::apply runs this below autograd)
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    const bool has_bias = ctx->saved_data["bias"].toBool();
    at::Tensor grad_y = grad;
    if (ctx->saved_data["scale"].toBool()) {  // grad * scale[sample], scale viewed as (N, 1, ..., 1)
      const at::Tensor scale = ctx->get_saved_variables()[0];
      std::vector<int64_t> shape(grad.dim(), 1);
      shape[0] = scale.numel();
      grad_y = at::mul(grad, scale.view(shape).to(grad.scalar_type()));
    }
    // needs_input_grad counts the tensor inputs given (an absent optional has no edge)
    at::Tensor grad_bias;
    if (has_bias && ctx->needs_input_grad(1)) {
      std::vector<int64_t> dims(std::max<int64_t>(grad.dim() - 1, 0));
      for (size_t d = 0; d < dims.size(); ++d) dims[d] = static_cast<int64_t>(d);
      grad_bias = grad_y.sum(dims).to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return {grad_y, grad_bias, grad, at::Tensor()};
  }
};

}  // namespace

// vitkernels::bias_residual recorded for autograd by EagerBiasResidual where autograd is recording, else the op alone
// (below autograd): the fused blocks' eager path on CPU (torch.compile traces the op and its registered autograd).
at::Tensor bias_residual_eager(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                               const std::optional<at::Tensor>& scale) {
  if (!records_autograd(y, bias, residual, scale)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op(y, bias, residual, scale);
  }
  return EagerBiasResidual::apply(y, bias, residual, scale);
}

TORCH_LIBRARY_IMPL(vitkernels, CompositeImplicitAutograd, m) {
  m.impl("bias_residual_eager", &bias_residual_eager);
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("bias_residual", &bias_residual_cpu);
  m.impl("bias_residual_", &bias_residual_inplace_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
