// Eager autograd of the CPU oneDNN Linear (semantics: vitkernels/reference/linear.py; Python side:
// vitkernels/ops/linear.py): y = x W^T + b through oneDNN's inner product (mkldnn::_linear_pointwise, the op behind
// torch's own oneDNN Linear), recorded for autograd by a C++ autograd Function, with its backward in C++ too:
//   grad_x = g W (oneDNN, the weight operand transposed by view; ATen's mm where the caller asks: grad_x_mm, chosen
//            by vitkernels/ops/linear.py grad_x_through_mm),  grad_W = g^T x (mm),  grad_b = column sums of g.
// The forward runs through ATen's GEMM instead where the caller asks (forward_mm, chosen by forward_through_mm):
// the same backward either way. With own_gemm (chosen by own_gemm_takes_it) all three products, forward and
// backward, run through vitkernels' own packed GEMM (csrc/cpu/gemm.cpp) instead, the bias added in its tiles.
// The same computation as the Python autograd.Function it replaces in eager training, minus ~100 us of Python per
// Linear forward + backward (the Function's apply, the saved-tensor unpacking, a dozen reshape / view / t calls
// through Python): about 50 Linears per Swin-T training step.
//
// Registered as CompositeImplicitAutograd: it runs in eager mode only. A double backward (create_graph) runs the
// backward with differentiable ATen ops (mm) instead of oneDNN's, whose op has no derivative.
//
// vitkernels::onednn_linear(x, weight, bias, activation) is the op torch.compile keeps (its fake and autograd are
// registered from Python): its CPU kernel here is the same oneDNN call, with the GELU as oneDNN's post-op. In C++
// rather than as a Python custom op because a compiled graph calls it for every Linear, forward and backward: the
// Python body cost ~40 us more per call (a (4, 96) x (96, 96) Linear: 70 -> 30 us, one thread).
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "gemm.h"

namespace vitkernels {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The fused activations (vitkernels/reference/linear.py ACTIVATIONS): none, gelu (erf), gelu_tanh.
enum class Activation { kNone, kGelu, kGeluTanh };

Activation parse_activation(c10::string_view activation, const char* op) {
  if (activation == "none") return Activation::kNone;
  if (activation == "gelu") return Activation::kGelu;
  if (activation == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, op, ": activation must be 'none', 'gelu' or 'gelu_tanh', got '", std::string(activation), "'");
}

// ATen's / oneDNN's name of a GELU activation's approximation ("none" = erf).
c10::string_view gelu_approximation(Activation activation) {
  return activation == Activation::kGeluTanh ? "tanh" : "none";
}

// act(a b^T + bias) for a (M, K), b (N, K) (any strides: oneDNN reorders the weight operand into its blocked
// layout on every call anyway, and reads a transposed view about as fast as a contiguous one) -> (M, N), the GELU
// as oneDNN's post-op (attr "gelu", algorithm "none" = erf or "tanh", as inductor's mkldnn fusion writes it). Empty
// products go to ATen, whose conventions (zeros for K = 0) oneDNN's primitive creation does not promise.
at::Tensor onednn_gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                       Activation activation = Activation::kNone) {
  const bool gelu = activation != Activation::kNone;
  if (a.numel() == 0 || b.numel() == 0) {
    const at::Tensor y = at::linear(a, b, bias);
    return gelu ? at::gelu(y, gelu_approximation(activation)) : y;
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  c10::List<std::optional<at::Scalar>> scalars;  // the GELU post-op takes one (unset) scalar
  std::optional<c10::string_view> algorithm;
  if (gelu) {
    scalars.push_back(std::nullopt);
    algorithm = gelu_approximation(activation);
  }
  return op.call(a.contiguous(), b, bias, gelu ? "gelu" : "none", scalars, algorithm);
}

// Rows of x (..., K) as a 2D operand: the product of its leading dims (not numel / K: K may be 0).
int64_t leading_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

// (..., K) x (N, K) -> (..., N), returned as a tensor that is not a view: the GEMM's 2D result reshaped would be a
// view of a tensor made inside the Function, which autograd forbids modifying in place afterwards (timm's
// `qkv += bias` does); the result takes the GEMM output's storage directly instead.
// gemm: the product's library, no activation for the first two (the forward_mm / own_gemm arguments of
// onednn_linear_eager): ATen's GEMM (at::linear: MKL's sgemm in a CPU build), vitkernels' own (gemm.h), oneDNN's.
enum class Gemm { kAten, kOwn, kOneDnn };

at::Tensor linear_unviewed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           Activation activation = Activation::kNone, Gemm gemm = Gemm::kOneDnn) {
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor x2 = x.reshape({leading_rows(x), K});
  const at::Tensor y = gemm == Gemm::kAten  ? at::linear(x2, weight, bias)
                       : gemm == Gemm::kOwn ? gemm_f32(x2, weight.t(), bias, "onednn_linear_eager")
                                            : onednn_gemm(x2, weight, bias, activation);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  std::vector<int64_t> strides(shape.size());
  int64_t step = 1;
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    strides[d] = step;
    step *= shape[d];
  }
  return at::empty({0}, y.options()).set_(y.storage(), y.storage_offset(), shape, strides);
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), op, ": weight must be (out_features, ", x.size(-1),
              "), got ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": x and weight must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
              ": x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be (", weight.size(0),
                "), got ", bias->sizes());
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat, op,
                ": bias must be a float32 CPU tensor");
  }
}

struct EagerOneDnnLinear : public torch::autograd::Function<EagerOneDnnLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool grad_x_mm, bool forward_mm,
                            bool own_gemm) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["grad_x_mm"] = grad_x_mm;
    ctx->saved_data["own_gemm"] = own_gemm;
    return linear_unviewed(x, weight, bias, Activation::kNone,
                           own_gemm ? Gemm::kOwn : forward_mm ? Gemm::kAten : Gemm::kOneDnn);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t N = weight.size(0), K = weight.size(1);
    const int64_t lead = leading_rows(x);
    const at::Tensor g = grads[0].reshape({lead, N});
    const at::Tensor x2 = x.reshape({lead, K});
    // ATen's mm for grad_x under create_graph (differentiable; oneDNN's op has no derivative) and where the caller
    // asked for it (grad_x_mm)
    const bool differentiable = at::GradMode::is_enabled();
    const bool own = !differentiable && ctx->saved_data["own_gemm"].toBool();
    const bool mm = differentiable || ctx->saved_data["grad_x_mm"].toBool();
    at::Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) {
      grad_x = (own  ? gemm_f32(g, weight, std::nullopt, "onednn_linear_eager backward")
                : mm ? at::mm(g, weight)
                     : onednn_gemm(g, weight.t(), std::nullopt))
                   .view(x.sizes());
    }
    if (ctx->needs_input_grad(1)) {
      grad_w = own ? gemm_f32(g.t(), x2, std::nullopt, "onednn_linear_eager backward") : at::mm(g.t(), x2);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_b = g.sum(0);
    return {grad_x, grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor onednn_linear_eager(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               bool grad_x_mm, bool forward_mm, bool own_gemm) {
  check_args(x, weight, bias, "onednn_linear_eager");
  return EagerOneDnnLinear::apply(x, weight, bias, grad_x_mm, forward_mm, own_gemm);
}

// vitkernels::onednn_linear's CPU kernel (its autograd: vitkernels/ops/linear.py).
at::Tensor onednn_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             c10::string_view activation) {
  const Activation act = parse_activation(activation, "onednn_linear");
  check_args(x, weight, bias, "onednn_linear");
  return linear_unviewed(x, weight, bias, act);
}

}  // namespace

TORCH_LIBRARY_IMPL(vitkernels, CompositeImplicitAutograd, m) {
  m.impl("onednn_linear_eager", &onednn_linear_eager);
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("onednn_linear", &onednn_linear_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
