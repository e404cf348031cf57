// Bias + GELU on CPU, fused (semantics: vitkernels/reference/bias_gelu.py): an MLP's fc1 runs as a plain GEMM and this
// op adds its bias inside the activation, so the bias is never broadcast-copied into the GEMM output (what addmm
// does) and the activation makes one pass. Its backward makes one pass too and sums the bias gradient on the way.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "row_ops.h"

#define VK_CPU_BODY "bias_gelu_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY
#include "row_ops_bf16.h"

namespace vitkernels {
namespace cpu {
namespace {

bool tanh_approximation(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "bias_gelu: approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
  return approximate == "tanh";
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1) && at::isFloatingType(bias.scalar_type()), op,
              ": bias must be a floating (", x.size(-1), ") tensor, got ", bias.scalar_type(), " ", bias.sizes());
  TORCH_CHECK(x.device() == bias.device(), op, ": bias must be on x's device ", x.device(), ", got ", bias.device());
}

// y (contiguous, of the compute type, may be x itself) = gelu(x + bias).
void forward_into(const at::Tensor& xc, const at::Tensor& bias, at::Tensor& y, bool tanh_approx) {
  const int64_t C = xc.size(-1), rows = C == 0 ? 0 : xc.numel() / C;
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "vitkernels_bias_gelu_cpu", [&] {
    const at::Tensor b = as_compute(bias, xc.scalar_type());
    const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
      VK_CPU_CALL(isa, bias_gelu_rows, x_ptr, b_ptr, y_ptr, begin, end, C, tanh_approx);
    });
  });
}

// y (contiguous bfloat16, may be x itself) = gelu(x + bias) for a contiguous bfloat16 x: the kernel widens and rounds
// in registers (bitwise converting x to float, the float op, and rounding back), the bias and arithmetic in float.
void bf16_gelu_rows(const at::Tensor& x, const at::Tensor& bias, at::Tensor& y, bool tanh_approx) {
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  const Isa isa = selected_isa();
  std::vector<float> b;
  at::Tensor bt;
  const float* b_ptr = optional_float_data(isa, bias, b, bt);
  const at::BFloat16* x_ptr = x.const_data_ptr<at::BFloat16>();
  at::BFloat16* y_ptr = y.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    VK_CPU_CALL(isa, bias_gelu_rows, x_ptr, b_ptr, y_ptr, begin, end, C, tanh_approx);
  });
}

}  // namespace

at::Tensor bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  check_args("bias_gelu", x, bias);
  const bool tanh_approx = tanh_approximation(approximate);
  if (x.scalar_type() == at::kBFloat16) {  // widened and rounded in registers
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
    bf16_gelu_rows(xc, bias, y, tanh_approx);
    return y;
  }
  const at::Tensor xc = as_compute(x, row_op_compute_type(x));
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  forward_into(xc, bias, y, tanh_approx);
  return y.to(x.scalar_type());
}

// In place, for inference: x = gelu(x + bias).
void bias_gelu_inplace_cpu(at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  check_args("bias_gelu_", x, bias);
  const bool tanh_approx = tanh_approximation(approximate);
  if (x.is_contiguous() && x.scalar_type() == row_op_compute_type(x)) {
    forward_into(x, bias, x, tanh_approx);
  } else if (x.is_contiguous() && x.scalar_type() == at::kBFloat16) {  // widened and rounded in registers
    bf16_gelu_rows(x, bias, x, tanh_approx);
  } else {
    at::Tensor xc = as_compute(x, row_op_compute_type(x)).clone();
    forward_into(xc, bias, xc, tanh_approx);
    x.copy_(xc);
  }
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& bias, c10::string_view approximate) {
  check_args("bias_gelu_backward", x, bias);
  TORCH_CHECK(grad.sizes() == x.sizes(), "bias_gelu_backward: grad must be ", x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == x.device(), "bias_gelu_backward: grad must be on x's device");
  const bool tanh_approx = tanh_approximation(approximate);
  if (all_bfloat16({&x, &grad})) {  // widened and rounded in registers, the bias gradient summed in float per block
    const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
    at::Tensor dx = at::empty_like(xc, at::MemoryFormat::Contiguous);
    const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
    const Isa isa = selected_isa();
    std::vector<float> b;
    at::Tensor bt;
    const float* b_ptr = optional_float_data(isa, bias, b, bt);
    const at::BFloat16* g_ptr = gc.const_data_ptr<at::BFloat16>();
    const at::BFloat16* x_ptr = xc.const_data_ptr<at::BFloat16>();
    at::BFloat16* dx_ptr = dx.mutable_data_ptr<at::BFloat16>();
    const std::vector<double> d_bias =
        parallel_rows_with_column_sums<float>(rows, C, 1, [&](int64_t begin, int64_t end, float* sums) {
          VK_CPU_CALL(isa, bias_gelu_backward_rows, g_ptr, x_ptr, b_ptr, dx_ptr, sums, begin, end, C, tanh_approx);
        });
    return {dx, column_sums_tensor(d_bias, 0, C, bias, bias.scalar_type())};
  }
  const at::ScalarType type = row_op_compute_type(x);
  const at::Tensor xc = as_compute(x, type), gc = as_compute(grad, type);
  at::Tensor dx = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  const Isa isa = selected_isa();
  std::vector<double> d_bias;
  AT_DISPATCH_FLOATING_TYPES(type, "vitkernels_bias_gelu_backward_cpu", [&] {
    const at::Tensor b = as_compute(bias, type);
    const scalar_t* g_ptr = gc.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();
    d_bias = parallel_rows_with_column_sums<scalar_t>(rows, C, 1, [&](int64_t begin, int64_t end, scalar_t* sums) {
      VK_CPU_CALL(isa, bias_gelu_backward_rows, g_ptr, x_ptr, b_ptr, dx_ptr, sums, begin, end, C, tanh_approx);
    });
  });
  return {dx.to(x.scalar_type()), column_sums_tensor(d_bias, 0, C, bias, bias.scalar_type())};
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_", &bias_gelu_inplace_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
