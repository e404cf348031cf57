// The row ops on bfloat16 tensors without whole-tensor conversions: bias_residual and bias_residual_layernorm (their
// in-place twins and backwards) run their float kernels on chunks widened into L1 scratch; bias_gelu, whose kernel
// widens and rounds in registers (cpu_simd.h), uses only optional_float_data. Include it after cpu_isa_each.h: it calls
// each instruction set's bf16_to_float / float_to_bf16 (cpu_simd.h) through VK_CPU_CALL.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "cpu_isa.h"
#include "row_ops.h"

namespace vitkernels {
namespace cpu {

// Floats per tensor per chunk: 8 KB, so a chunk's buffers (up to five) stay in L1 between the widening, the kernel and
// the rounding (measured: 1024 to 4096 alike; 8192, the buffers in L2, ~20% slower).
constexpr int64_t kBf16ChunkFloats = 2048;

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

// In parallel over chunks of the rows of `samples` equal samples (kBf16ChunkFloats per tensor, at most kRowBlock
// rows; a chunk never crosses a sample, so a per-sample scale is one value per chunk), each chunk's rows of the `in`
// tensors are widened into per-thread float scratch, kernel(in, out, first_row, n, sample, partial) runs the float
// row kernel on them (in[i], out[j]: (n, C) float, null where the tensor's pointer is null: an absent operand or an
// output not wanted; `sample`: the chunk's sample; `partial`: `sums * C` floats for the kernel to add column sums
// into, null when sums is 0), and the `out` scratch is rounded back into the out tensors' rows (an out tensor may be
// an in tensor: its chunk was read first). `partial` is added into the thread's double sums and zeroed every
// kRowBlock rows or so, as parallel_rows_with_column_sums does (per chunk, a few rows at large C, that cost as much
// as the rows themselves). Returns the column sums over all rows in double, (sums, C) row-major, like
// parallel_rows_with_column_sums. The rows are bitwise what converting the whole tensors to float, running the
// kernel and rounding back gives, at a fraction of the memory traffic; the sums differ from it by float rounding.
template <size_t NIn, size_t NOut, typename Kernel>
std::vector<double> bf16_rows_via_float_with_column_sums(Isa isa, int64_t rows, int64_t C, int64_t samples,
                                                         int64_t sums,
                                                         const std::array<const at::BFloat16*, NIn>& in,
                                                         const std::array<at::BFloat16*, NOut>& out,
                                                         const Kernel& kernel) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> per_thread(threads * sums * C, 0.0);
  if (rows > 0 && C > 0) {
    TORCH_CHECK(samples > 0 && rows % samples == 0, "bf16_rows_via_float: ", rows, " rows are not ", samples,
                " whole samples");
    const int64_t rows_per_sample = rows / samples;
    const int64_t chunk = std::clamp<int64_t>(kBf16ChunkFloats / C, 1, kRowBlock);
    at::parallel_for(0, rows, std::max(row_grain(C), chunk), [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      TORCH_CHECK(tid < threads, "thread ", tid, " beyond the ", threads, " expected");
      // each buffer on its own 64-byte boundary: a 64-byte vector store that straddles two cache lines costs
      // about twice an aligned one, and the conversions are bound by their stores
      const int64_t stride = (std::min(chunk, end - begin) * C + 15) / 16 * 16;
      std::vector<float> scratch_storage((NIn + NOut) * stride + 16);
      float* scratch = scratch_storage.data() +
                       (16 - reinterpret_cast<uintptr_t>(scratch_storage.data()) / sizeof(float) % 16) % 16;
      std::vector<float> partial(sums * C, 0.0f);
      int64_t partial_rows = 0;  // rows summed into `partial` since it was last added into `total`
      double* total = per_thread.data() + tid * sums * C;
      std::array<const float*, NIn> in_f;
      std::array<float*, NOut> out_f;
      for (int64_t r = begin; r < end;) {
        const int64_t n = std::min({chunk, end - r, rows_per_sample - r % rows_per_sample});
        for (size_t i = 0; i < NIn; ++i) {
          float* buf = in[i] ? scratch + i * stride : nullptr;
          if (buf) VK_CPU_CALL(isa, bf16_to_float, reinterpret_cast<const uint16_t*>(in[i] + r * C), buf, n * C);
          in_f[i] = buf;
        }
        for (size_t j = 0; j < NOut; ++j) out_f[j] = out[j] ? scratch + (NIn + j) * stride : nullptr;
        kernel(in_f, out_f, r, n, r / rows_per_sample, sums ? partial.data() : nullptr);
        for (size_t j = 0; j < NOut; ++j) {
          if (out[j]) VK_CPU_CALL(isa, float_to_bf16, out_f[j], reinterpret_cast<uint16_t*>(out[j] + r * C), n * C);
        }
        r += n;
        partial_rows += n;
        if (sums > 0 && (partial_rows >= kRowBlock || r == end)) {
          for (int64_t i = 0; i < sums * C; ++i) total[i] += static_cast<double>(partial[i]);
          std::fill(partial.begin(), partial.end(), 0.0f);
          partial_rows = 0;
        }
      }
    });
  }
  std::vector<double> result(sums * C, 0.0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < sums * C; ++i) result[i] += per_thread[t * sums * C + i];
  return result;
}

// bf16_rows_via_float_with_column_sums without sums: kernel(in, out, first_row, n, sample).
template <size_t NIn, size_t NOut, typename Kernel>
void bf16_rows_via_float(Isa isa, int64_t rows, int64_t C, int64_t samples,
                         const std::array<const at::BFloat16*, NIn>& in, const std::array<at::BFloat16*, NOut>& out,
                         const Kernel& kernel) {
  bf16_rows_via_float_with_column_sums<NIn, NOut>(
      isa, rows, C, samples, 0, in, out,
      [&](const auto& in_f, const auto& out_f, int64_t first, int64_t n, int64_t sample, float*) {
        kernel(in_f, out_f, first, n, sample);
      });
}

// Whether a row op's tensors take the bfloat16 path above (every one bfloat16; made contiguous by the caller).
inline bool all_bfloat16(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->scalar_type() != at::kBFloat16) return false;
  }
  return true;
}

}  // namespace cpu
}  // namespace vitkernels
