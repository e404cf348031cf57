// Swin V2 (shifted) window attention on CPU, fused: scaled cosine attention with a continuous position bias, from the
// qkv Linear's output in original NHWC token order to the attention output in original order (semantics:
// vitkernels/reference/window_attention_v2.py), forward and backward.
//
// V1's design (csrc/cpu/window_attention.cpp), shared rather than copied: the window addressing is WindowGeometry's
// (shift, padding, partition and mask regions: csrc/include/vitkernels/window_geometry.h), the argument checks are
// window_attention_args.h's, the vector math and register-tiled GEMM are cpu_simd.h's (compiled per instruction
// set by cpu_isa_each.h), and the instruction set is the one V1's kernels run (VITKERNELS_CPU_ISA caps both). One task
// is one window; each thread gathers the window's qkv rows, L2-normalises each head's q and k, computes
// S = tau q^ k^T + bias + mask, the softmax and P v in cache-resident scratch, and stores the output rows back at the
// tokens they came from. The bias table (16 sigmoid of the cpb MLP, computed by PyTorch) is expanded once per call
// into (nH, N, N) rows. The backward reads P as the forward saved it in training (save_probs) or recomputes it from
// the saved log-sum-exp, and reduces the bias and scale
// gradients over windows in per-thread accumulators (the bias's in the compute type, as V1's; reduced in double).
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vitkernels/window_attention_args.h"
#include "vitkernels/window_geometry.h"
#include "window_attention_cpu.h"
#include "window_attention_host.h"

namespace vitkernels {
namespace cpu {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

// Everything a V2 task needs; S is the storage type, T the compute type (float, or double for double).
template <typename S, typename T>
struct WindowAttentionV2Args {
  WindowGeometry g;
  int64_t N, nH, hd, C;  // tokens per window, heads, head dim, nH * hd
  bool shifted;
  const S* qkv;          // (B, H, W, 3C)
  const S* pad_row;      // (3C): what a padded token's q, k, v are (the qkv Linear's bias, or zeros)
  const T* bias_rows;    // (nH, N, NP): table[rel(i, j), h], -inf for the padding columns j >= N
  const T* scale;        // (nH): tau, the multiplier of the cosine similarities
  T* lse;                // (B * nW, nH, N), or null when probs is set
  T* probs;              // (B * nW, nH, N, NP): the softmax the forward saves (save_probs) for the backward, or null
  S* out;                // forward: (B, H, W, C)
  const S* grad_out;     // backward: (B, H, W, C)
  S* grad_qkv;           // backward: (B, H, W, 3C)
};

}  // namespace cpu
}  // namespace vitkernels

// --- the kernel body, once per instruction set (V1's window_attention.cpp compiles its own in its TU) --------------
#define VK_CPU_BODY "window_attention_v2_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY

namespace vitkernels {
namespace cpu {
namespace {

using Problem = WindowAttentionProblem;

// The problem of a call: V1's checks (qkv, the ((2wh-1)(2ww-1), nH) table, qkv_bias, window, shift, heads), plus
// the (nH,) scale.
Problem check_v2_args(const char* op, const at::Tensor& qkv, const at::Tensor& bias_table, const at::Tensor& scale,
                      const std::optional<at::Tensor>& qkv_bias, at::IntArrayRef window_size,
                      at::IntArrayRef shift_size, int64_t num_heads) {
  const Problem p = check_window_attention_args(op, qkv, bias_table, qkv_bias, window_size, shift_size, num_heads);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == num_heads, op, ": scale must be (", num_heads, "), got ",
              scale.sizes());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()) && at::isFloatingType(bias_table.scalar_type()), op,
              ": bias_table and scale must be floating tensors");
  check_same_device(op, qkv, scale, "scale");
  return p;
}

template <typename S, typename T>
WindowAttentionV2Args<S, T> make_args(const Problem& p, const at::Tensor& qkv, const at::Tensor& pad_row,
                                      const std::vector<T>& bias_rows, const at::Tensor& scale,
                                      const at::Tensor& softmax_state, bool probs) {
  WindowAttentionV2Args<S, T> a{};
  a.g = p.g;
  a.N = p.N; a.nH = p.nH; a.hd = p.hd; a.C = p.C;
  a.shifted = p.g.shift_h > 0 || p.g.shift_w > 0;
  a.qkv = qkv.const_data_ptr<S>();
  a.pad_row = pad_row.const_data_ptr<S>();
  a.bias_rows = bias_rows.data();
  a.scale = scale.const_data_ptr<T>();
  (probs ? a.probs : a.lse) = softmax_state.mutable_data_ptr<T>();
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_v2_cpu(const at::Tensor& qkv_in, const at::Tensor& bias_table,
                                                           const at::Tensor& scale_in,
                                                           const std::optional<at::Tensor>& qkv_bias,
                                                           at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                           int64_t num_heads, bool save_probs) {
  const Problem p = check_v2_args("window_attention_v2", qkv_in, bias_table, scale_in, qkv_bias, window_size,
                                  shift_size, num_heads);
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  const auto acc = window_attention_acc_type(qkv);
  const at::Tensor scale = scale_in.to(acc).contiguous();
  at::Tensor out = at::empty(p.out_shape(), qkv.options());
  // the softmax state: the lse, or with save_probs (training) P itself, rows zero-padded to NP (as V1's)
  at::Tensor state = save_probs ? at::empty({p.windows(), p.nH, p.N, round_to_vector(p.N)}, qkv.options().dtype(acc))
                                : at::empty({p.windows(), p.nH, p.N}, qkv.options().dtype(acc));
  if (p.windows() == 0) return {out, state};
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "vitkernels_window_attention_v2_cpu",
                                  [&] {
    using T = at::opmath_type<scalar_t>;
    const std::vector<T> bias_rows = expand_bias<T>(p, bias_table);
    auto a = make_args<scalar_t, T>(p, qkv, pad_row, bias_rows, scale, state, save_probs);
    a.out = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.windows(), 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals ftz(std::is_same<T, float>::value);
      std::vector<T> scratch(baseline::ScratchV2<T>::size(p.N, p.nH, p.hd), T(0));  // zero: padding stays zero
      std::vector<int64_t> source(2 * p.N);  // this window's tokens, then the next one's
      VK_CPU_CALL_COMPUTE(T, isa, forward_windows_v2, a, begin, end, scratch.data(), source.data());
    });
  });
  return {out, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_v2_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& bias_table, const at::Tensor& scale_in,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, int64_t num_heads) {
  // The forward's output (an argument of the op, checked) is not read: delta = rowsum(dO * O) is computed from P
  // and dP in fp32, more accurate than from the stored (possibly bf16) output.
  const char* op = "window_attention_v2_backward";
  const Problem p = check_v2_args(op, qkv_in, bias_table, scale_in, qkv_bias, window_size, shift_size, num_heads);
  const bool probs = check_backward_softmax_state(op, p, qkv_in, grad_out_in, out_in, lse_in, "lse");
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor state = lse_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  const at::Tensor scale = scale_in.to(window_attention_acc_type(qkv)).contiguous();
  at::Tensor grad_qkv = at::empty_like(qkv);  // every real token's row is written (each is in one window)
  const int64_t threads = at::get_num_threads();
  // Per-thread sums over windows: d_bias (nH, N, NP) in the compute type (below), d_scale (nH) and the padded
  // tokens' (dk, dv) (nH, 2, hd) in double.
  std::vector<double> d_scale(threads * p.nH, 0.0);
  const int64_t NP = round_to_vector(p.N);
  at::Tensor grad_table = at::zeros(bias_table.sizes(), bias_table.options().dtype(at::kDouble));
  std::vector<double> d_pad(threads * p.nH * 2 * p.hd, 0.0);
  const Isa isa = selected_isa();
  if (p.windows() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(),
                                    "vitkernels_window_attention_v2_bwd_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      // with the saved softmax the kernel does not recompute S, so it reads no bias rows
      const std::vector<T> bias_rows = probs ? std::vector<T>() : expand_bias<T>(p, bias_table);
      auto a = make_args<scalar_t, T>(p, qkv, pad_row, bias_rows, scale, state, probs);
      a.grad_out = grad_out.const_data_ptr<scalar_t>();
      a.grad_qkv = grad_qkv.mutable_data_ptr<scalar_t>();
      std::vector<T> d_bias(threads * p.nH * p.N * NP, T(0));
      at::parallel_for(0, p.windows(), 1, [&](int64_t begin, int64_t end) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid < threads, op, ": thread ", tid, " beyond the ", threads, " expected");
        const FlushDenormals ftz(std::is_same<T, float>::value);
        std::vector<T> scratch(baseline::ScratchV2<T>::size(p.N, p.nH, p.hd), T(0));
        std::vector<int64_t> source(2 * p.N);  // this window's tokens, then the next one's
        T* bias_acc = d_bias.data() + tid * p.nH * p.N * NP;
        double* scale_acc = d_scale.data() + tid * p.nH;
        double* pad_acc = d_pad.data() + tid * p.nH * 2 * p.hd;
        VK_CPU_CALL_COMPUTE(T, isa, backward_windows_v2, a, begin, end, scratch.data(), source.data(), bias_acc,
                            scale_acc, pad_acc);
      });
      grad_table = reduce_table_grad_double(p, d_bias.data(), NP, threads, bias_table);
    });
  }
  // Reduce the threads' sums: table gradient by relative position, d scale, d qkv_bias.
  at::Tensor grad_scale = at::zeros({p.nH}, scale_in.options().dtype(at::kDouble));
  double* gs = grad_scale.mutable_data_ptr<double>();
  for (int64_t h = 0; h < p.nH; ++h)
    for (int64_t t = 0; t < threads; ++t) gs[h] += d_scale[t * p.nH + h];
  return {grad_qkv, grad_table.to(bias_table.scalar_type()), grad_scale.to(scale_in.scalar_type()),
          reduce_qkv_bias_grad(p, d_pad, threads, qkv, qkv_bias)};
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("window_attention_v2", &window_attention_v2_cpu);
  m.impl("window_attention_v2_backward", &window_attention_v2_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
