// Bias + GELU on CPU, fused (semantics: vitkernels/reference/bias_gelu.py): an MLP's fc1 runs as a plain GEMM and this
// op adds its bias inside the activation, so the bias is never broadcast-copied into the GEMM output (what addmm
// does) and the activation makes one pass. Its backward makes one pass too and sums the bias gradient on the way.
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>
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

// The type the kernels read and write x in: bfloat16 as it is (widened and rounded in the kernel's registers),
// everything else as its compute type (float, or double).
at::ScalarType storage_type(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : row_op_compute_type(x);
}

// The bias as contiguous data of compute_t<S>, kept alive in keep / keep_tensor (a bfloat16 bias beside bfloat16 x
// widened without a dispatcher round trip: optional_float_data).
template <typename S>
const compute_t<S>* bias_data(Isa isa, const at::Tensor& bias, std::vector<float>& keep, at::Tensor& keep_tensor) {
  if constexpr (std::is_same_v<compute_t<S>, float>) {
    return optional_float_data(isa, bias, keep, keep_tensor);
  } else {
    keep_tensor = as_compute(bias, c10::CppTypeToScalarType<S>::value);
    return keep_tensor.const_data_ptr<S>();
  }
}

// y (contiguous, of xc's storage_type, may be xc itself) = gelu(xc + bias), xc contiguous of its storage_type.
void forward_into(const at::Tensor& xc, const at::Tensor& bias, at::Tensor& y, bool tanh_approx) {
  const int64_t C = xc.size(-1), rows = C == 0 ? 0 : xc.numel() / C;
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "vitkernels_bias_gelu_cpu", [&] {
    std::vector<float> keep;
    at::Tensor keep_tensor;
    const compute_t<scalar_t>* b_ptr = bias_data<scalar_t>(isa, bias, keep, keep_tensor);
    const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
      VK_CPU_CALL(isa, bias_gelu_rows, x_ptr, b_ptr, y_ptr, begin, end, C, tanh_approx);
    });
  });
}

}  // namespace

at::Tensor bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  check_args("bias_gelu", x, bias);
  const bool tanh_approx = tanh_approximation(approximate);
  const at::Tensor xc = as_compute(x, storage_type(x));
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  forward_into(xc, bias, y, tanh_approx);
  return y.to(x.scalar_type());
}

// In place, for inference: x = gelu(x + bias).
void bias_gelu_inplace_cpu(at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  check_args("bias_gelu_", x, bias);
  const bool tanh_approx = tanh_approximation(approximate);
  if (x.is_contiguous() && x.scalar_type() == storage_type(x)) {
    forward_into(x, bias, x, tanh_approx);
  } else {
    at::Tensor xc = as_compute(x, storage_type(x)).clone();
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
  // bfloat16 read as it is only when both are (a mixed pair is converted to the compute type)
  const at::ScalarType type = all_bfloat16({&x, &grad}) ? at::kBFloat16 : row_op_compute_type(x);
  const at::Tensor xc = as_compute(x, type), gc = as_compute(grad, type);
  at::Tensor dx = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  const Isa isa = selected_isa();
  std::vector<double> d_bias;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, type, "vitkernels_bias_gelu_backward_cpu", [&] {
    using T = compute_t<scalar_t>;
    std::vector<float> keep;
    at::Tensor keep_tensor;
    const T* b_ptr = bias_data<scalar_t>(isa, bias, keep, keep_tensor);
    const scalar_t* g_ptr = gc.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();
    // the bias gradient summed in T per block of rows, in double across them
    d_bias = parallel_rows_with_column_sums<T>(rows, C, 1, [&](int64_t begin, int64_t end, T* sums) {
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
