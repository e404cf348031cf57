// The host side of a fused window attention call around window_attention_kernel.h's (window, head) items, shared by
// the 2D op (window_attention.cpp: WindowAttentionProblem, WindowGeometry) and the 3D op (window_attention_3d.cpp:
// WindowAttention3DProblem, WindowGeometry3D): the per-thread zeroed scratch, the parallel loop over items, the
// saved log-sum-exp, and the backward's per-thread bias-gradient sums reduced in double.
//
// Include it after cpu_isa_each.h compiled window_attention_kernel.h (VK_CPU_CALL names the per-ISA namespaces).
// A Problem has g (the geometry: relative_index), N, nH, hd, C, windows(), out_shape() and shifted().
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "vitkernels/window_attention_args.h"
#include "window_attention_cpu.h"
#include "window_attention_host.h"

namespace vitkernels {
namespace cpu {
namespace window_attention_run {

template <typename Problem>
using Geometry = decltype(std::declval<Problem>().g);

template <typename S, typename T, typename Problem>
WindowAttentionArgs<S, T, Geometry<Problem>> make_args(const Problem& p, double scale, const at::Tensor& qkv,
                                                       const at::Tensor& pad_row, const std::vector<T>& bias_rows,
                                                       const at::Tensor& softmax_state, bool probs) {
  WindowAttentionArgs<S, T, Geometry<Problem>> a{};
  a.g = p.g;
  a.N = p.N; a.nH = p.nH; a.hd = p.hd; a.C = p.C;
  a.scale = scale;
  a.shifted = p.shifted();
  a.qkv = qkv.const_data_ptr<S>();
  a.pad_row = pad_row.const_data_ptr<S>();
  a.bias_rows = bias_rows.data();
  (probs ? a.probs : a.lse) = softmax_state.mutable_data_ptr<T>();
  return a;
}

// A thread's scratch for (window, head) items, zeroed (the matrices' padding must read as zeros); sized from N and
// head_dim (N = 343 for MONAI's 7x7x7 windows).
template <typename T>
struct ThreadScratch {
  std::vector<T> values;
  std::vector<int64_t> tokens;
  ThreadScratch(int64_t N, int64_t hd)
      : values(baseline::ItemScratch<T>::size(N, hd), T(0)), tokens(baseline::ItemScratch<T>::token_size(N)) {}
};

// The forward after the argument checks: qkv contiguous, pad_row the padded tokens' (and, with bias_every_token,
// every token's added) q, k, v. Returns (out, the softmax state for the backward in the compute type: the row
// log-sum-exp (B * nW, nH, N), or with save_probs the softmax itself (B * nW, nH, N, NP), its rows zero-padded to
// NP = round_to_vector(N) columns: whole aligned vectors, streamed to memory by the kernel).
template <typename Problem>
std::tuple<at::Tensor, at::Tensor> run_forward(const Problem& p, const at::Tensor& qkv, const at::Tensor& table,
                                               const at::Tensor& pad_row, double scale, bool bias_every_token,
                                               bool save_probs = false) {
  at::Tensor out = at::empty(p.out_shape(), qkv.options());
  const auto state_options = qkv.options().dtype(window_attention_acc_type(qkv));
  at::Tensor state = save_probs ? at::empty({p.windows(), p.nH, p.N, round_to_vector(p.N)}, state_options)
                                : at::empty({p.windows(), p.nH, p.N}, state_options);
  if (p.windows() == 0) return {out, state};
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "vitkernels_window_attention_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const std::vector<T> bias_rows = expand_bias<T>(p, table);
    auto a = make_args<scalar_t, T>(p, scale, qkv, pad_row, bias_rows, state, save_probs);
    a.bias_every_token = bias_every_token;
    a.out = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.windows() * p.nH, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz(std::is_same<T, float>::value);
      ThreadScratch<T> t(p.N, p.hd);
      VK_CPU_CALL_COMPUTE(T, isa, forward_items, a, begin, end, t.values.data(), t.tokens.data());
    });
  });
  return {out, state};
}

// The backward after the argument checks; the qkv bias's gradient (empty without qkv_bias) sums what the padded
// tokens (and, with bias_every_token, all tokens) pass to it. The forward's output (an argument of the op, checked)
// is not read: the kernel gets sum_d dO O from P and dP, already in its cache. `state` is the forward's softmax
// state, checked by the caller: the lse, or (`probs`) the saved softmax.
template <typename Problem>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const char* op, const Problem& p,
                                                            const at::Tensor& grad_out_in, const at::Tensor& qkv,
                                                            const at::Tensor& table,
                                                            const std::optional<at::Tensor>& qkv_bias,
                                                            const at::Tensor& state_in, double scale,
                                                            bool bias_every_token, bool probs = false) {
  const at::Tensor grad_out = grad_out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor state = state_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  at::Tensor grad_qkv = at::empty_like(qkv);  // every real token's row is written (each is in one window)
  const int64_t threads = at::get_num_threads();
  const int64_t NP = round_to_vector(p.N);
  // Per-thread sums: d_bias (nH, N, NP) over windows in the compute type, what the qkv bias receives (nH, 3, hd) in
  // double; reduced over threads in double below.
  std::vector<double> d_qkv_bias(threads * p.nH * 3 * p.hd, 0.0);
  at::Tensor grad_table = at::zeros(table.sizes(), table.options().dtype(at::kDouble));  // stays zero without windows
  const Isa isa = selected_isa();
  if (p.windows() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "vitkernels_window_attention_bwd_cpu",
                                    [&] {
      using T = at::opmath_type<scalar_t>;
      // with the saved softmax the kernel does not recompute S, so it reads no bias rows
      const std::vector<T> bias_rows = probs ? std::vector<T>() : expand_bias<T>(p, table);
      auto a = make_args<scalar_t, T>(p, scale, qkv, pad_row, bias_rows, state, probs);
      a.bias_every_token = bias_every_token;
      a.grad_out = grad_out.const_data_ptr<scalar_t>();
      a.grad_qkv = grad_qkv.mutable_data_ptr<scalar_t>();
      std::vector<T> d_bias(threads * p.nH * p.N * NP, T(0));
      at::parallel_for(0, p.windows() * p.nH, 1, [&](int64_t begin, int64_t end) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid < threads, op, ": thread ", tid, " beyond the ", threads, " expected");
        const FlushDenormals ftz(std::is_same<T, float>::value);
        ThreadScratch<T> t(p.N, p.hd);
        VK_CPU_CALL_COMPUTE(T, isa, backward_items, a, begin, end, t.values.data(), t.tokens.data(),
                                d_bias.data() + tid * p.nH * p.N * NP, d_qkv_bias.data() + tid * p.nH * 3 * p.hd);
      });
      // Reduce the threads' sums and scatter d_bias into the table by relative position.
      grad_table = reduce_table_grad_double(p, d_bias.data(), NP, threads, table);
    });
  }
  at::Tensor grad_bias = at::empty({0}, qkv.options());
  if (qkv_bias.has_value()) {
    at::Tensor gb = at::zeros({3 * p.C}, qkv.options().dtype(at::kDouble));
    double* g = gb.mutable_data_ptr<double>();
    for (int64_t t = 0; t < threads; ++t) {
      for (int64_t h = 0; h < p.nH; ++h) {
        const double* acc = d_qkv_bias.data() + (t * p.nH + h) * 3 * p.hd;
        for (int64_t part = 0; part < 3; ++part) {
          for (int64_t d = 0; d < p.hd; ++d) g[part * p.C + h * p.hd + d] += acc[part * p.hd + d];
        }
      }
    }
    grad_bias = gb.to(qkv_bias->scalar_type());
  }
  return {grad_qkv, grad_table.to(table.scalar_type()), grad_bias};
}

}  // namespace window_attention_run
}  // namespace cpu
}  // namespace vitkernels
