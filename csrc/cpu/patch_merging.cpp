// Swin patch merging's gather + LayerNorm on CPU, fused (semantics: vitkernels/reference/patch_merging.py): each output
// row gathers its 2x2 neighbours straight from the NHWC input into a cache-resident row and normalises it, instead of
// pad + reshape/permute copy + LayerNorm (two full passes and a fresh tensor in timm). The reduction Linear follows
// as a plain GEMM. The backward recomputes the gathered row, and scatters the LayerNorm's input gradient back.
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "eager_autograd.h"
#include "row_ops.h"

#define VK_CPU_BODY "patch_merging_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY
#include "row_ops_bf16.h"

namespace vitkernels {
namespace cpu {
namespace {

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating (B, H, W, C) tensor, got ", x.scalar_type(), " ", x.sizes());
}

void check_params(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias) {
  for (const auto* t : {&weight, &bias}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == 4 * x.size(3) && at::isFloatingType((*t)->scalar_type()), op,
                ": weight and bias must be floating (4C = ", 4 * x.size(3), ") tensors, got ", (*t)->sizes());
    TORCH_CHECK((*t)->device() == x.device(), op, ": weight and bias must be on x's device");
  }
}

}  // namespace

// (out (B, ceil(H/2), ceil(W/2), 4C), mean, rstd (B, ceil(H/2), ceil(W/2)) of the compute type).
std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merging_norm_cpu(const at::Tensor& x,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      double eps) {
  check_x("patch_merging_norm", x);
  check_params("patch_merging_norm", x, weight, bias);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), H2 = (H + 1) / 2, W2 = (W + 1) / 2;
  const at::ScalarType type = row_op_compute_type(x);
  const int64_t rows = B * H2 * W2;
  const Isa isa = selected_isa();
  at::Tensor mean = at::empty({B, H2, W2}, x.options().dtype(type));
  at::Tensor rstd = at::empty({B, H2, W2}, x.options().dtype(type));
  if (C == 0) empty_row_statistics(mean, rstd);  // rows of width 0: no kernel writes them
  if (x.scalar_type() == at::kBFloat16) {  // row by row through float scratch: no whole-tensor conversion
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty({B, H2, W2, 4 * C}, xc.options());
    if (rows > 0 && C > 0) {
      std::vector<float> w, b;
      at::Tensor wt, bt;
      const float* w_ptr = optional_float_data(isa, weight, w, wt);
      const float* b_ptr = optional_float_data(isa, bias, b, bt);
      const at::BFloat16* x_ptr = xc.const_data_ptr<at::BFloat16>();
      at::BFloat16* o_ptr = out.mutable_data_ptr<at::BFloat16>();
      float* m_ptr = mean.mutable_data_ptr<float>();
      float* r_ptr = rstd.mutable_data_ptr<float>();
      const float e = static_cast<float>(eps);
      at::parallel_for(0, rows, row_grain(4 * C), [&](int64_t begin, int64_t end) {
        std::vector<float> row(4 * C), out_row(4 * C);
        VK_CPU_CALL(isa, patch_merging_norm_rows, x_ptr, H, W, C, w_ptr, b_ptr, e, o_ptr, m_ptr, r_ptr, row.data(),
                    out_row.data(), begin, end);
      });
    }
    return {out, mean, rstd};
  }
  const at::Tensor xc = as_compute(x, type);
  at::Tensor out = at::empty({B, H2, W2, 4 * C}, xc.options());
  if (rows > 0 && C > 0) {
    AT_DISPATCH_FLOATING_TYPES(type, "vitkernels_patch_merging_norm_cpu", [&] {
      const at::Tensor w = weight.has_value() ? as_compute(*weight, type) : at::Tensor();
      const at::Tensor b = bias.has_value() ? as_compute(*bias, type) : at::Tensor();
      const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
      const scalar_t* w_ptr = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* b_ptr = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
      scalar_t* m_ptr = mean.mutable_data_ptr<scalar_t>();
      scalar_t* r_ptr = rstd.mutable_data_ptr<scalar_t>();
      const scalar_t e = static_cast<scalar_t>(eps);
      at::parallel_for(0, rows, row_grain(4 * C), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> row(4 * C);
        VK_CPU_CALL(isa, patch_merging_norm_rows, x_ptr, H, W, C, w_ptr, b_ptr, e, o_ptr, m_ptr, r_ptr, row.data(),
                    static_cast<scalar_t*>(nullptr), begin, end);
      });
    });
  }
  return {out.to(x.scalar_type()), mean, rstd};
}

// (grad_x (B, H, W, C), grad_weight (4C), grad_bias (4C)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merging_norm_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight) {
  const char* op = "patch_merging_norm_backward";
  check_x(op, x);
  check_params(op, x, weight, std::nullopt);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), H2 = (H + 1) / 2, W2 = (W + 1) / 2;
  const int64_t rows = B * H2 * W2;
  const at::ScalarType type = row_op_compute_type(x);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == H2 && grad.size(2) == W2 &&
                  grad.size(3) == 4 * C,
              op, ": grad must be (", B, ", ", H2, ", ", W2, ", ", 4 * C, "), got ", grad.sizes());
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && mean.scalar_type() == type &&
                  rstd.scalar_type() == type,
              op, ": mean and rstd must be the forward's (", rows, ") ", type, " row statistics");
  for (const at::Tensor* t : {&grad, &mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device(), op, ": every tensor must be on x's device");
  }
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const Isa isa = selected_isa();
  std::vector<double> sums(2 * 4 * C, 0.0);
  const at::ScalarType param_type = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  if (x.scalar_type() == at::kBFloat16 && grad.scalar_type() == at::kBFloat16) {  // row by row through float
    const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
    at::Tensor dx = at::empty({B, H, W, C}, xc.options());
    if (rows > 0 && C > 0) {
      std::vector<float> w;
      at::Tensor wt;
      const float* w_ptr = optional_float_data(isa, weight, w, wt);
      const at::BFloat16* g_ptr = gc.const_data_ptr<at::BFloat16>();
      const at::BFloat16* x_ptr = xc.const_data_ptr<at::BFloat16>();
      const float* m_ptr = mc.const_data_ptr<float>();
      const float* r_ptr = rc.const_data_ptr<float>();
      at::BFloat16* dx_ptr = dx.mutable_data_ptr<at::BFloat16>();
      sums = parallel_rows_with_column_sums<float>(rows, 4 * C, 2, [&](int64_t begin, int64_t end, float* acc) {
        std::vector<float> row(4 * C), d_row(4 * C), g_row(4 * C);
        VK_CPU_CALL(isa, patch_merging_norm_backward_rows, g_ptr, x_ptr, H, W, C, m_ptr, r_ptr, w_ptr, dx_ptr, acc,
                    row.data(), d_row.data(), g_row.data(), begin, end);
      });
    }
    return {dx, column_sums_tensor(sums, 0, 4 * C, x, param_type), column_sums_tensor(sums, 1, 4 * C, x, param_type)};
  }
  const at::Tensor xc = as_compute(x, type), gc = as_compute(grad, type);
  at::Tensor dx = at::empty({B, H, W, C}, xc.options());
  if (rows > 0 && C > 0) {
    AT_DISPATCH_FLOATING_TYPES(type, "vitkernels_patch_merging_norm_backward_cpu", [&] {
      const at::Tensor w = weight.has_value() ? as_compute(*weight, type) : at::Tensor();
      const scalar_t* g_ptr = gc.const_data_ptr<scalar_t>();
      const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
      const scalar_t* m_ptr = mc.const_data_ptr<scalar_t>();
      const scalar_t* r_ptr = rc.const_data_ptr<scalar_t>();
      const scalar_t* w_ptr = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();
      sums = parallel_rows_with_column_sums<scalar_t>(rows, 4 * C, 2, [&](int64_t begin, int64_t end, scalar_t* acc) {
        std::vector<scalar_t> row(4 * C), d_row(4 * C);
        VK_CPU_CALL(isa, patch_merging_norm_backward_rows, g_ptr, x_ptr, H, W, C, m_ptr, r_ptr, w_ptr, dx_ptr, acc,
                    row.data(), d_row.data(), static_cast<scalar_t*>(nullptr), begin, end);
      });
    });
  }
  return {dx.to(x.scalar_type()), column_sums_tensor(sums, 0, 4 * C, x, param_type),
          column_sums_tensor(sums, 1, 4 * C, x, param_type)};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops through the dispatcher (dispatch modes, fake tensors and other devices see them), below autograd except
// where a graph must be recorded.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitkernels::patch_merging_norm", "")
                             .typed<decltype(patch_merging_norm_cpu)>();
  return op.call(x, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                           const std::optional<at::Tensor>& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitkernels::patch_merging_norm_backward", "")
                             .typed<decltype(patch_merging_norm_backward_cpu)>();
  return op.call(grad, x, mean, rstd, weight);
}

// patch_merging_norm and its backward as a C++ autograd Function: patch_merging_norm_eager's training path, the
// same kernels and gradients as the op's registered (Python) autograd without its Python per call.
struct EagerPatchMergingNorm : public torch::autograd::Function<EagerPatchMergingNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
    auto [out, mean, rstd] = forward_op(x, weight, bias, eps);  // (Function::apply runs this below autograd)
    ctx->save_for_backward({x, mean, rstd, weight.value_or(at::Tensor())});
    ctx->saved_data["weight"] = weight.has_value();
    ctx->saved_data["bias"] = bias.has_value();
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[3];
    const bool has_weight = ctx->saved_data["weight"].toBool(), has_bias = ctx->saved_data["bias"].toBool();
    const BelowAutogradUnlessCreatingGraph below;
    auto [grad_x, grad_weight, grad_bias] = backward_op(grads[0], saved[0], saved[1], saved[2],
                                                        weight.defined() ? std::optional<at::Tensor>(weight)
                                                                         : std::nullopt);
    // needs_input_grad counts the tensor inputs given (an absent optional has no edge)
    const bool need_weight = has_weight && ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    return {grad_x, need_weight ? grad_weight.to(weight.scalar_type()) : at::Tensor(),
            need_bias ? grad_bias.to(ctx->saved_data["bias_dtype"].toScalarType()) : at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// The merged, normalised map of vitkernels::patch_merging_norm, recorded for autograd by EagerPatchMergingNorm where
// autograd is recording, else the op alone (below autograd): the fused PatchMerging's eager path on CPU
// (torch.compile traces the op and its registered autograd, vitkernels/ops/patch_merging.py).
at::Tensor patch_merging_norm_eager(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, double eps) {
  if (!records_autograd(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return std::get<0>(forward_op(x, weight, bias, eps));
  }
  return EagerPatchMergingNorm::apply(x, weight, bias, eps);
}

TORCH_LIBRARY_IMPL(vitkernels, CompositeImplicitAutograd, m) {
  m.impl("patch_merging_norm_eager", &patch_merging_norm_eager);
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("patch_merging_norm", &patch_merging_norm_cpu);
  m.impl("patch_merging_norm_backward", &patch_merging_norm_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
