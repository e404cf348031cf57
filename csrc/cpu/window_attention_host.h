// Host-side pieces of the CPU window attention ops (V1 window_attention.cpp, V2 window_attention_v2.cpp, 3D
// window_attention_3d.cpp) around their per-instruction-set kernels: the relative position bias expanded into
// per-head rows before the kernels run, and the per-thread accumulators of the backward reduced into the table and
// (V2) qkv-bias gradients.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "vitkernels/window_attention_args.h"
#include "window_attention_cpu.h"

namespace vitkernels {
namespace cpu {

// The table offset of every (query i, key j) pair of a window, relative_index(i, j) * stride, row-major (N, N): the
// index math (divisions) done once per call instead of once per head and pair. stride nH: the element offset in
// the (rows, nH) table; 1: the table row.
template <typename Problem>
std::vector<int64_t> relative_offsets(const Problem& p, int64_t stride) {
  std::vector<int64_t> rel(p.N * p.N);
  for (int64_t i = 0; i < p.N; ++i)
    for (int64_t j = 0; j < p.N; ++j) rel[i * p.N + j] = p.g.relative_index(i, j) * stride;
  return rel;
}

// Rows (of N entries) per task of the host loops below: serial for small problems (Swin-T stage 1: 3 heads x 49
// rows), split over the threads where heads are many (stage 4: 24 heads; a MONAI 7x7x7 window: 343 x 343 per head).
inline int64_t host_rows_grain(int64_t N) { return (8192 + N - 1) / N; }

// (nH, N, NP) rows of the relative position bias, table[rel(i, j), h] in T, -inf in the padding columns j >= N (they
// then drop out of the softmax): what the kernels' S accumulators start from.
// Problem: WindowAttentionProblem, or WindowAttention3DProblem (its geometry's 3D relative index).
template <typename T, typename Problem>
std::vector<T> expand_bias(const Problem& p, const at::Tensor& table) {
  const int64_t N = p.N, NP = round_to_vector(N);
  const at::Tensor t = table.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* tab = t.const_data_ptr<T>();
  const std::vector<int64_t> rel = relative_offsets(p, p.nH);
  std::vector<T> rows(p.nH * N * NP);
  at::parallel_for(0, p.nH * N, host_rows_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t hi = begin; hi < end; ++hi) {  // row i of head h
      const int64_t h = hi / N;
      const int64_t* r = rel.data() + (hi % N) * N;
      T* row = rows.data() + hi * NP;
      for (int64_t j = 0; j < N; ++j) row[j] = tab[r[j] + h];
      for (int64_t j = N; j < NP; ++j) row[j] = -std::numeric_limits<T>::infinity();
    }
  });
  return rows;
}

// The (table_rows, nH) table gradient in double from `threads` blocks of per-thread sums of dS, d_bias[t] (nH, N,
// row_stride) (row_stride >= N): summed over the threads in double, in thread order, and scattered by relative
// position, in the same order for every thread count split; heads in parallel (each head owns its table column).
template <typename Acc, typename Problem>
at::Tensor reduce_table_grad_double(const Problem& p, const Acc* d_bias, int64_t row_stride, int64_t threads,
                                    const at::Tensor& table) {
  at::Tensor grad = at::empty(table.sizes(), table.options().dtype(at::kDouble));
  double* gt = grad.mutable_data_ptr<double>();
  const int64_t N = p.N, rows = table.size(0);
  const std::vector<int64_t> rel = relative_offsets(p, 1);  // table rows
  const int64_t block = p.nH * N * row_stride;
  // split by heads (each head owns its table column), host_rows_grain's rows rounded up to whole heads of N rows.
  // A head's column is summed in the task's own buffer and written once: the table is row-major (rows, nH), so
  // heads of different threads share its cache lines, and summing into it directly passed them back and forth
  // between the cores at every += (on a 2-core AMD Zen 2 that took ~10% of the backward at Swin-T stage 3, b8).
  at::parallel_for(0, p.nH, (host_rows_grain(N) + N - 1) / N, [&](int64_t begin, int64_t end) {
    std::vector<double> column(rows);
    for (int64_t h = begin; h < end; ++h) {
      std::fill(column.begin(), column.end(), 0.0);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t* r = rel.data() + i * N;
        const Acc* row = d_bias + (h * N + i) * row_stride;
        for (int64_t j = 0; j < N; ++j) {
          double sum = 0;
          for (int64_t t = 0; t < threads; ++t) sum += static_cast<double>(row[t * block + j]);
          column[r[j]] += sum;
        }
      }
      for (int64_t k = 0; k < rows; ++k) gt[k * p.nH + h] = column[k];
    }
  });
  return grad;
}

// Checks a backward's arguments and its softmax state, the forward's second output: the lse (B * nW, nH, N) or the
// saved softmax (B * nW, nH, N, NP) (shape, dtype, device; its values are the forward's, as lse's are). Returns
// whether the state is the saved softmax (4-D). V1 and V2 (their forwards' save_probs).
inline bool check_backward_softmax_state(const char* op, const WindowAttentionProblem& p, const at::Tensor& qkv,
                                         const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& state,
                                         const char* state_name) {
  if (state.dim() != 4) {
    check_window_attention_backward_args(op, p, qkv, grad_out, out, state);
    return false;
  }
  check_window_attention_backward_args(op, p, qkv, grad_out, out, std::nullopt);
  const auto acc = window_attention_acc_type(qkv);
  const int64_t NP = round_to_vector(p.N);
  TORCH_CHECK(state.sizes() == at::IntArrayRef({p.windows(), p.nH, p.N, NP}) && state.scalar_type() == acc, op, ": ",
              state_name, " must be the forward's lse (B * nW, nH, N) or its saved softmax (B * nW, nH, N, NP) = (",
              p.windows(), ", ", p.nH, ", ", p.N, ", ", NP, ") ", acc, ", got ", state.sizes(), " ",
              state.scalar_type());
  check_same_device(op, qkv, state, state_name);
  return true;
}

// d_pad holds `threads` blocks of (nH, 2, hd) sums of padded tokens' (dk, dv); returns the (3C) qkv-bias gradient
// in its dtype (the q part is zero: padded queries are cropped), or an empty tensor without a qkv bias.
inline at::Tensor reduce_qkv_bias_grad(const WindowAttentionProblem& p, const std::vector<double>& d_pad,
                                       int64_t threads, const at::Tensor& qkv,
                                       const std::optional<at::Tensor>& qkv_bias) {
  if (!qkv_bias.has_value()) return at::empty({0}, qkv.options());
  at::Tensor grad = at::zeros({3 * p.C}, qkv.options().dtype(at::kDouble));
  double* g = grad.mutable_data_ptr<double>();
  for (int64_t h = 0; h < p.nH; ++h) {
    for (int64_t d = 0; d < p.hd; ++d) {
      for (int64_t t = 0; t < threads; ++t) {
        const double* pad = d_pad.data() + (t * p.nH + h) * 2 * p.hd;
        g[p.C + h * p.hd + d] += pad[d];
        g[2 * p.C + h * p.hd + d] += pad[p.hd + d];
      }
    }
  }
  return grad.to(qkv_bias->scalar_type());
}

}  // namespace cpu
}  // namespace vitkernels
