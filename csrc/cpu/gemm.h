// vitkernels' own CPU GEMM (csrc/cpu/gemm.cpp): float32, packed operands, the register tile of cpu_simd.h's
// instruction sets. Used by the Linear's eager path (csrc/cpu/linear.cpp) where vitkernels/ops/linear.py's
// own_gemm_takes_it says.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace vitkernels {
namespace cpu {

// An elementwise epilogue of the product, applied to C's finished values v (the product, plus C's old values and the
// bias where those are added) as the last pass over K stores them: an MLP's activation in fc1's output, its
// derivative in fc2's input gradient, with no pass of their own over the (M, H) hidden activation.
//   gelu:             C = gelu(v) (erf, or tanh-approximated with tanh), and side = v where side is not null (the
//                     pre-activation the backward reads);
//   gelu and grad:    C = v * gelu'(side) (side read: the forward's pre-activation), and C's column sums written
//                     to col_sums (N) where col_sums is not null (the fc1 bias's gradient).
// side has C's shape, row stride ld_side >= N.
struct GemmEpilogue {
  bool gelu = false;
  bool tanh = false;
  bool grad = false;
  float* side = nullptr;
  int64_t ld_side = 0;
  float* col_sums = nullptr;
};

// C (M, N) = [C +] A B [+ bias on every row] (C's values added with accumulate), A(i, k) = A[i * a_row + k * a_col],
// B(k, j) = B[k * b_row + j * b_col], C row-major with row stride ldc >= N, bias (N) or null, then the epilogue.
// Every index the caller passes must address its arrays (the Tensor overload below checks that): this one reads A,
// B, bias (and a grad epilogue's side) and writes C (and a gelu epilogue's side, the column sums) at exactly those
// offsets.
// Threads: at::get_num_threads() over blocks of C's rows (one thread inside a parallel region).
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
              int64_t b_row, int64_t b_col, float* C, int64_t ldc, const float* bias, bool accumulate = false,
              const GemmEpilogue& epilogue = GemmEpilogue{});

// a (..., K) @ b (K, N) [+ bias (N)] -> a new contiguous (..., N) float32 tensor; a 2D a and b of any strides (an
// N-D a is reshaped to its rows). Checks its arguments (CPU, float32, shapes), naming `op` in the message.
at::Tensor gemm_f32(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias, const char* op);

}  // namespace cpu
}  // namespace vitkernels
