// Swin (shifted) window attention on CPU, fused: from the qkv Linear's output in original NHWC token order to the
// attention output in original order (semantics: vitkernels/reference/window_attention.py), forward and backward.
//
// Nothing image-sized is materialised: no rolled, padded or partitioned copy of qkv, no bias or mask tensor per
// window. One task is one (window, head) pair, so deep stages with few windows and many heads still split evenly
// over the threads; it reads its head's q, k, v slices of the window's tokens by index math (shift and padding in
// the addressing, padded tokens read the qkv bias), computes S, the softmax and P v in the thread's cache-resident
// scratch and stores the output slices back at the tokens they came from. The relative position bias is expanded
// once per call into (nH, N, N) rows (a few hundred KB at most, shared by all tasks) that initialise S; the
// shifted-window mask is a comparison of the tokens' region ids, applied only in windows that straddle regions.
// The backward reads P as the forward saved it (save_probs: training) or recomputes it from the saved log-sum-exp,
// and sums the bias gradient over windows in per-thread accumulators before scattering it into the table.
//
// The per-task code is in window_attention_kernel.h, compiled here for AVX-512, AVX2 and the baseline; the best
// one the CPU supports runs (VITKERNELS_CPU_ISA=avx512|avx2|baseline caps the choice, for tests and comparisons).
// The host side around it (scratch, parallel loop, gradient reductions) is window_attention_run.h, shared with the
// 3D op (window_attention_3d.cpp).
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
#include <cstdlib>
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

// --- the kernel body, once per instruction set ---------------------------------------------------------------------
#define VK_CPU_BODY "window_attention_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY

#include "window_attention_run.h"

namespace vitkernels {
namespace cpu {
namespace {

using Problem = WindowAttentionProblem;
using window_attention_run::run_backward;
using window_attention_run::run_forward;

}  // namespace

std::string window_attention_cpu_isa() { return isa_name(selected_isa()); }

// With save_probs (training) the second output is the softmax P (B * nW, nH, N, NP), rows zero-padded to NP = N
// rounded up to the vector width, rather than the lse: the backward then reads P instead of recomputing it (one
// small GEMM and the exp pass fewer per (window, head) item; the forward streams P out). P takes about 0.6x qkv's
// memory at head_dim 32 (NP floats per token and head against 3 head_dim); timm's attention keeps its softmax for
// its backward too.
std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& qkv_in, const at::Tensor& table,
                                                        const std::optional<at::Tensor>& qkv_bias,
                                                        at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                        int64_t num_heads, double scale, bool save_probs) {
  const Problem p =
      check_window_attention_args("window_attention", qkv_in, table, qkv_bias, window_size, shift_size, num_heads);
  const at::Tensor qkv = qkv_in.contiguous();
  return run_forward(p, qkv, table, window_attention_pad_row(qkv, qkv_bias), scale, /*bias_every_token=*/false,
                     save_probs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& table,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, int64_t num_heads, double scale) {
  const char* op = "window_attention_backward";
  const Problem p = check_window_attention_args(op, qkv_in, table, qkv_bias, window_size, shift_size, num_heads);
  const bool probs = check_backward_softmax_state(op, p, qkv_in, grad_out_in, out_in, lse_in, "lse");
  return run_backward(op, p, grad_out_in, qkv_in.contiguous(), table, qkv_bias, lse_in, scale,
                      /*bias_every_token=*/false, probs);
}

// window_attention_add_bias: qkv is the qkv Linear's output without its bias, which the op adds to every token;
// save_probs as window_attention's.
std::tuple<at::Tensor, at::Tensor> window_attention_add_bias_cpu(const at::Tensor& qkv_in, const at::Tensor& table,
                                                                 const at::Tensor& qkv_bias,
                                                                 at::IntArrayRef window_size,
                                                                 at::IntArrayRef shift_size, int64_t num_heads,
                                                                 double scale, bool save_probs) {
  const Problem p = check_window_attention_args("window_attention_add_bias", qkv_in, table, qkv_bias, window_size,
                                                shift_size, num_heads);
  const at::Tensor qkv = qkv_in.contiguous();
  return run_forward(p, qkv, table, window_attention_pad_row(qkv, qkv_bias), scale, /*bias_every_token=*/true,
                     save_probs);
}

// softmax_state: the forward's second output, the lse (B * nW, nH, N) or the saved softmax (B * nW, nH, N, NP).
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_add_bias_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& table, const at::Tensor& qkv_bias,
    const at::Tensor& out_in, const at::Tensor& softmax_state, at::IntArrayRef window_size,
    at::IntArrayRef shift_size, int64_t num_heads, double scale) {
  const char* op = "window_attention_add_bias_backward";
  const Problem p = check_window_attention_args(op, qkv_in, table, qkv_bias, window_size, shift_size, num_heads);
  const bool probs =
      check_backward_softmax_state(op, p, qkv_in, grad_out_in, out_in, softmax_state, "softmax_state");
  return run_backward(op, p, grad_out_in, qkv_in.contiguous(), table, qkv_bias, softmax_state, scale,
                      /*bias_every_token=*/true, probs);
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
  m.impl("window_attention_add_bias", &window_attention_add_bias_cpu);
  m.impl("window_attention_add_bias_backward", &window_attention_add_bias_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
