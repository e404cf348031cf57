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
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
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
#include "eager_autograd.h"
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

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// vitkernels::window_attention_add_bias and its backward through the dispatcher (dispatch modes, fake tensors and
// other devices see the ops themselves), below autograd except where a graph must be recorded.
std::tuple<at::Tensor, at::Tensor> add_bias_forward_op(const at::Tensor& qkv, const at::Tensor& table,
                                                       const at::Tensor& qkv_bias, at::IntArrayRef window_size,
                                                       at::IntArrayRef shift_size, int64_t num_heads, double scale,
                                                       bool save_probs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitkernels::window_attention_add_bias", "")
                             .typed<decltype(window_attention_add_bias_cpu)>();
  return op.call(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, save_probs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_bias_backward_op(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& qkv_bias,
    const at::Tensor& out, const at::Tensor& softmax_state, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    int64_t num_heads, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitkernels::window_attention_add_bias_backward", "")
                             .typed<decltype(window_attention_add_bias_backward_cpu)>();
  return op.call(grad_out, qkv, table, qkv_bias, out, softmax_state, window_size, shift_size, num_heads, scale);
}

// window_attention_add_bias (saving the softmax) and its backward as a C++ autograd Function: the eager training
// path of the fused Swin block, the same kernels and gradients as the op's registered (Python) autograd without its
// ~0.2 ms of Python per call (forward + backward; 12 calls in a Swin-T training step).
struct EagerWindowAttentionAddBias : public torch::autograd::Function<EagerWindowAttentionAddBias> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& table,
                            const at::Tensor& qkv_bias, at::IntArrayRef window_size, at::IntArrayRef shift_size,
                            int64_t num_heads, double scale) {
    // (Function::apply runs this below autograd)
    auto [out, probs] =
        add_bias_forward_op(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, /*save_probs=*/true);
    // the inputs version-checked; out (this Function's output) and the softmax its own
    ctx->save_for_backward({qkv, table, qkv_bias, out, probs});
    ctx->saved_data["window_size"] = window_size.vec();
    ctx->saved_data["shift_size"] = shift_size.vec();
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> window = ctx->saved_data["window_size"].toIntVector();
    const std::vector<int64_t> shift = ctx->saved_data["shift_size"].toIntVector();
    const BelowAutogradUnlessCreatingGraph below;
    auto [grad_qkv, grad_table, grad_bias] =
        add_bias_backward_op(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], window, shift,
                             ctx->saved_data["num_heads"].toInt(), ctx->saved_data["scale"].toDouble());
    return {grad_qkv, grad_table, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// The attention output of vitkernels::window_attention_add_bias, recorded for autograd by
// EagerWindowAttentionAddBias where autograd is recording (the softmax saved), else the forward alone (the lse,
// below autograd): the fused Swin block's eager path on CPU (torch.compile traces the op and its registered
// autograd instead, vitkernels/ops/window_attention.py).
at::Tensor window_attention_add_bias_eager(const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& qkv_bias,
                                           at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                           int64_t num_heads, double scale) {
  if (!records_autograd(qkv, table, qkv_bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return std::get<0>(add_bias_forward_op(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, false));
  }
  return EagerWindowAttentionAddBias::apply(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale);
}

TORCH_LIBRARY_IMPL(vitkernels, CompositeImplicitAutograd, m) {
  m.impl("window_attention_add_bias_eager", &window_attention_add_bias_eager);
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
  m.impl("window_attention_add_bias", &window_attention_add_bias_cpu);
  m.impl("window_attention_add_bias_backward", &window_attention_add_bias_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
