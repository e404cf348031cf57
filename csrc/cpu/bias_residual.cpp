// Bias + (drop-path scaled) residual add on CPU, fused (semantics: vitkernels/reference/bias_residual.py): a block's
// last Linear runs as a plain GEMM and this op adds its bias, the per-sample drop-path scale and the residual in one
// pass. The backward is plain tensor arithmetic (vitkernels/ops/bias_residual.py).
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

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

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("bias_residual", &bias_residual_cpu);
  m.impl("bias_residual_", &bias_residual_inplace_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
