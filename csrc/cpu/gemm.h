// vitkernels' own CPU GEMM (csrc/cpu/gemm.cpp): float32, packed operands, the register tile of cpu_simd.h's
// instruction sets. Used by the Linear's eager path (csrc/cpu/linear.cpp) where vitkernels/ops/linear.py's
// own_gemm_takes_it says.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace vitkernels {
namespace cpu {

// C (M, N) = [C +] A B [+ bias on every row] (C's values added with accumulate), A(i, k) = A[i * a_row + k * a_col],
// B(k, j) = B[k * b_row + j * b_col], C row-major with row stride ldc >= N, bias (N) or null. Every index the
// caller passes must address its arrays (the Tensor overload below checks that): this one reads A, B and bias and
// writes C at exactly those offsets.
// Threads: at::get_num_threads() over blocks of C's rows (one thread inside a parallel region).
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
              int64_t b_row, int64_t b_col, float* C, int64_t ldc, const float* bias, bool accumulate = false);

// a (..., K) @ b (K, N) [+ bias (N)] -> a new contiguous (..., N) float32 tensor; a 2D a and b of any strides (an
// N-D a is reshaped to its rows). Checks its arguments (CPU, float32, shapes), naming `op` in the message.
at::Tensor gemm_f32(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias, const char* op);

}  // namespace cpu
}  // namespace vitkernels
