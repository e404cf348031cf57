// Host-side pieces of the CPU window attention ops (V1 window_attention.cpp, V2 window_attention_v2.cpp, 3D
// window_attention_3d.cpp) around their per-instruction-set kernels: the relative position bias expanded into
// per-head rows before the kernels run, and (V2) the per-thread double accumulators of the backward reduced into the
// table and qkv-bias gradients.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "vitkernels/window_attention_args.h"
#include "window_attention_cpu.h"

namespace vitkernels {
namespace cpu {

// (nH, N, NP) rows of the relative position bias, table[rel(i, j), h] in T, -inf in the padding columns j >= N (they
// then drop out of the softmax): what the kernels' S accumulators start from.
// Problem: WindowAttentionProblem, or WindowAttention3DProblem (its geometry's 3D relative index).
template <typename T, typename Problem>
std::vector<T> expand_bias(const Problem& p, const at::Tensor& table) {
  const int64_t NP = round_to_vector(p.N);
  const at::Tensor t = table.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* tab = t.const_data_ptr<T>();
  std::vector<T> rows(p.nH * p.N * NP, -std::numeric_limits<T>::infinity());
  for (int64_t h = 0; h < p.nH; ++h)
    for (int64_t i = 0; i < p.N; ++i)
      for (int64_t j = 0; j < p.N; ++j) rows[(h * p.N + i) * NP + j] = tab[p.g.relative_index(i, j) * p.nH + h];
  return rows;
}

// d_bias holds `threads` blocks of (nH, N, N) sums of dS; returns the (table_rows, nH) table gradient in the
// table's dtype (summed in double, scattered by relative position).
inline at::Tensor reduce_table_grad(const WindowAttentionProblem& p, const std::vector<double>& d_bias,
                                    int64_t threads, const at::Tensor& table) {
  at::Tensor grad = at::zeros(table.sizes(), table.options().dtype(at::kDouble));
  double* gt = grad.mutable_data_ptr<double>();
  const int64_t NN = p.N * p.N;
  for (int64_t h = 0; h < p.nH; ++h) {
    for (int64_t ij = 0; ij < NN; ++ij) {
      double sum = 0;
      for (int64_t t = 0; t < threads; ++t) sum += d_bias[(t * p.nH + h) * NN + ij];
      gt[p.g.relative_index(ij / p.N, ij % p.N) * p.nH + h] += sum;
    }
  }
  return grad.to(table.scalar_type());
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
