// The in-place (inference) row ops on bfloat16 tensors without whole-tensor conversions (bias_gelu_, bias_residual_,
// bias_residual_layernorm_). Include it after cpu_isa_each.h: it calls each instruction set's bf16_to_float /
// float_to_bf16 (cpu_simd.h) through VK_CPU_CALL.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu_isa.h"
#include "row_ops.h"

namespace vitkernels {
namespace cpu {

// An optional (C,) operand (bias, scale, LayerNorm affine) as float for these paths: a contiguous bfloat16 one is
// widened into `keep` by the instruction set's bf16_to_float, without a Tensor.to() (a dispatcher round trip per
// operand per call, ~100 of them per Swin-T step, costs more than these few-hundred-value conversions); any other
// through optional_data into `keep_tensor`.
inline const float* optional_float_data(Isa isa, const std::optional<at::Tensor>& t, std::vector<float>& keep,
                                        at::Tensor& keep_tensor) {
  if (!t.has_value()) return nullptr;
  if (t->scalar_type() != at::kBFloat16 || !t->is_contiguous()) return optional_data<float>(t, at::kFloat, keep_tensor);
  keep.resize(t->numel());
  VK_CPU_CALL(isa, bf16_to_float, reinterpret_cast<const uint16_t*>(t->const_data_ptr<at::BFloat16>()), keep.data(),
              t->numel());
  return keep.data();
}

// In parallel over chunks of rows (~32 KB of float per tensor; a chunk never crosses a sample, so a per-sample scale
// is one value per chunk), each chunk's rows of the `in` tensors are widened into per-thread float scratch,
// kernel(in, out, first_row, n, sample) runs the float row kernel on them (in[i], out[j]: (n, C) float; `sample`:
// the chunk's sample, first_row / rows_per_sample), and the `out` scratch is rounded back into the out tensors' rows
// (an out tensor may be an in tensor: its chunk was read first). Bitwise what converting the whole tensors to
// float, running the kernel and rounding back gives, at a fraction of the memory traffic.
template <size_t NIn, size_t NOut, typename Kernel>
void bf16_rows_via_float(Isa isa, int64_t rows, int64_t C, int64_t rows_per_sample,
                         const std::array<const at::BFloat16*, NIn>& in, const std::array<at::BFloat16*, NOut>& out,
                         const Kernel& kernel) {
  if (rows == 0 || C == 0) return;
  TORCH_CHECK(rows_per_sample > 0 && rows % rows_per_sample == 0, "bf16_rows_via_float: ", rows,
              " rows are not whole samples of ", rows_per_sample);
  const int64_t chunk = std::max<int64_t>(1, 8192 / C);
  at::parallel_for(0, rows, std::max(row_grain(C), chunk), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((NIn + NOut) * std::min(chunk, end - begin) * C);
    std::array<const float*, NIn> in_f;
    std::array<float*, NOut> out_f;
    for (int64_t r = begin; r < end;) {
      const int64_t n = std::min({chunk, end - r, rows_per_sample - r % rows_per_sample});
      for (size_t i = 0; i < NIn; ++i) {
        float* buf = scratch.data() + i * n * C;
        VK_CPU_CALL(isa, bf16_to_float, reinterpret_cast<const uint16_t*>(in[i] + r * C), buf, n * C);
        in_f[i] = buf;
      }
      for (size_t j = 0; j < NOut; ++j) out_f[j] = scratch.data() + (NIn + j) * n * C;
      kernel(in_f, out_f, r, n, r / rows_per_sample);
      for (size_t j = 0; j < NOut; ++j) {
        VK_CPU_CALL(isa, float_to_bf16, out_f[j], reinterpret_cast<uint16_t*>(out[j] + r * C), n * C);
      }
      r += n;
    }
  });
}

}  // namespace cpu
}  // namespace vitkernels
