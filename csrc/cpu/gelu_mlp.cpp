// A transformer MLP on CPU with its hidden activation kept in cache (semantics: vitkernels/reference/gelu_mlp.py):
//   y = gelu(x W1^T + b1) W2^T + b2,   x (M, C), W1 (H, C), W2 (N, H), hidden (M, H) with H ~ 4C.
// Computed by blocks of R rows, one block per task: h = x[rows] W1^T (ATen's CPU GEMM, single-threaded inside the
// task), h = gelu(h + b1) in place (bias_gelu's row kernel), y[rows] = h W2^T + b2; h is a per-task (R, H) buffer
// of ~512 KB, so the GEMM writes it, the GELU rewrites it and the second GEMM reads it while it is in the core's L2.
// The unblocked sequence writes the whole (M, H) hidden to memory and reads it twice, and the allocator hands out
// that buffer fresh (page-faulted in) on every call: at Swin-T stage 1, batch 4 (M = 12544, C = 96, H = 384), a
// 19 MB tensor. Pays where the weights are small beside the activations (the weights are re-read per block): see
// vitkernels/ops/gelu_mlp.py for where `auto` takes it.
//
// Each output row is the same GEMM arithmetic as the unblocked sequence's (the GEMMs' rows are independent), up to
// the GEMM library's own row-blocking choices. With own_gemm (vitkernels/ops/linear.py OWN_GEMM, float32 only) the
// blocks' GEMMs are vitkernels' own (csrc/cpu/gemm.cpp), as the layers' Linears then are, instead of ATen's.
// gelu_mlp_train is the same forward keeping fc1's output for gelu_mlp_backward, which runs by blocks too.
// Autograd: vitkernels/ops/gelu_mlp.py.
//
// gelu_mlp_eager (below) is the same MLP unblocked, where the blocks do not pay (weights too large to re-read per
// block: Swin-T stages 2-4), on vitkernels' own GEMM with the GELU in its epilogues: fc1's GEMM applies bias + GELU
// as it stores its tiles (and, under autograd, stores the pre-activation beside), and the backward's g W2 multiplies
// by gelu'(pre) and sums b1's gradient as it stores its tiles, so neither direction spends a pass of its own on the
// (M, H) hidden activation or its gradient. Eager only (a C++ autograd Function, like onednn_linear_eager);
// gelu_mlp_own and gelu_mlp_own_grad_pre are its forward and its GELU-backward GEMM as plain ops, for torch.compile.
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "eager_autograd.h"
#include "gemm.h"
#include "row_ops.h"

#define VK_CPU_BODY "bias_gelu_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY

namespace vitkernels {
namespace cpu {
namespace {

// Bytes of the per-task hidden block: well inside a 1-2 MB L2 beside the block's input and output rows.
constexpr int64_t kHiddenBlockBytes = 512 * 1024;

void check_param(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x,
                 at::IntArrayRef shape) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " must be ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must be ", x.scalar_type(), " like x, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              t->device());
}

// Rows per forward block: kHiddenBlockBytes of hidden activation, a multiple of 16, at least 16.
int64_t gelu_mlp_block_rows(int64_t hidden, int64_t element_bytes) {
  const int64_t rows = kHiddenBlockBytes / std::max<int64_t>(1, hidden * element_bytes);
  return std::max<int64_t>(16, rows / 16 * 16);
}

// The checked sizes of one call: x (M, C) as rows (M = the product of x's leading dims), hidden H, output N.
struct MlpShape {
  int64_t M, C, H, N;
};

MlpShape check_mlp_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                        const at::Tensor& w2, const std::optional<at::Tensor>& b2, c10::string_view approximate,
                        int64_t block_rows) {
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble), op,
              ": x must be a float32 or float64 (..., C) tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(approximate == "none" || approximate == "tanh", op, ": approximate must be 'none' or 'tanh', got '",
              std::string(approximate), "'");
  TORCH_CHECK(block_rows >= 0, op, ": block_rows must be >= 0 (0: chosen from the hidden width), got ", block_rows);
  const int64_t C = x.size(-1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, op, ": w1 must be (H, ", C, "), got ", w1.sizes());
  const int64_t H = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == H, op, ": w2 must be (N, ", H, "), got ", w2.sizes());
  const int64_t N = w2.size(0);
  check_param(op, "w1", w1, x, {H, C});
  check_param(op, "w2", w2, x, {N, H});
  check_param(op, "b1", b1, x, {H});
  check_param(op, "b2", b2, x, {N});
  int64_t M = 1;  // not numel / C: C may be 0
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  return {M, C, H, N};
}

// out (rows, n) = [out +] a (rows, k) b (k, n) [+ bias (n)] (out's values added with accumulate), single-threaded
// inside a task: vitkernels' own GEMM where own (float32; any strides of a and b, out with unit column stride),
// else ATen's CPU kernels (no dispatcher, hence no autograd on a worker thread whose grad mode is its own).
void block_mm(bool own, at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
              const std::optional<at::Tensor>& bias, bool accumulate) {
  if (own && out.scalar_type() == at::kFloat) {
    TORCH_CHECK(out.stride(1) == 1 && a.size(1) == b.size(0) && out.size(0) == a.size(0) && out.size(1) == b.size(1),
                "gelu_mlp: internal block product of mismatched shapes");
    gemm_f32(out.size(0), out.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
             b.const_data_ptr<float>(), b.stride(0), b.stride(1), out.mutable_data_ptr<float>(), out.stride(0),
             bias.has_value() ? bias->const_data_ptr<float>() : nullptr, accumulate);
  } else if (accumulate) {
    at::cpu::addmm_out(out, out, a, b);
  } else if (bias.has_value()) {
    at::cpu::addmm_out(out, *bias, a, b);  // as F.linear: the bias added by the GEMM (beta = 1)
  } else {
    at::cpu::mm_out(out, a, b);
  }
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

// y (M, N) = gelu(x W1^T + b1) W2^T + b2 by blocks of R rows; with `pre` (M, H) defined, the blocks' x W1^T (before
// the bias) are kept there for the backward, and the GELU goes to a per-task buffer instead of in place.
void forward_blocks(const MlpShape& s, const at::Tensor& xc, const at::Tensor& w1, const at::Tensor& bias1,
                    const at::Tensor& w2, const std::optional<at::Tensor>& b2, bool tanh_approx, int64_t R,
                    at::Tensor& y, at::Tensor* pre, bool own) {
  const int64_t blocks = (s.M + R - 1) / R;
  const at::Tensor w1t = w1.detach().t(), w2t = w2.detach().t();  // (C, H), (H, N): the GEMM reads them transposed
  const std::optional<at::Tensor> bias2 =
      b2.has_value() ? std::optional<at::Tensor>(b2->detach().contiguous()) : std::nullopt;
  const Isa isa = selected_isa();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "vitkernels_gelu_mlp_cpu", [&] {
    const scalar_t* b1_ptr = bias1.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      // Inside a parallel region the GEMMs run on this thread only (block_mm).
      at::Tensor h = at::empty({std::min(R, s.M), s.H}, xc.options());
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t r0 = blk * R, rows = std::min(R, s.M - r0);
        at::Tensor hb = h.narrow(0, 0, rows);
        at::Tensor fc1 = pre != nullptr ? pre->narrow(0, r0, rows) : hb;
        block_mm(own, fc1, xc.narrow(0, r0, rows), w1t, std::nullopt, false);
        VK_CPU_CALL(isa, bias_gelu_rows, fc1.const_data_ptr<scalar_t>(), b1_ptr, hb.mutable_data_ptr<scalar_t>(),
                    int64_t{0}, rows, s.H, tanh_approx);
        at::Tensor yb = y.narrow(0, r0, rows);
        block_mm(own, yb, hb, w2t, bias2, false);
      }
    });
  });
}

// x (..., C) as its (M, C) rows, detached: the blocks are narrowed on worker threads, whose grad mode is their own
// (a view of a tensor that requires grad would record autograd history there).
at::Tensor rows_of(const at::Tensor& x, const MlpShape& s) { return x.detach().contiguous().view({s.M, s.C}); }

at::Tensor bias_or_zeros(const std::optional<at::Tensor>& bias, int64_t size, const at::Tensor& like) {
  // gelu(h + 0) is gelu(h) for every h (-0 aside): without b1 the row kernels add zeros
  return bias.has_value() ? bias->detach().contiguous() : at::zeros({size}, like.options());
}

// The forward of gelu_mlp and gelu_mlp_train: y (..., N), and with keep_pre also fc1's output (M, H) (else an
// undefined tensor).
std::tuple<at::Tensor, at::Tensor> run_forward(const char* op, const at::Tensor& x, const at::Tensor& w1,
                                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                               const std::optional<at::Tensor>& b2, c10::string_view approximate,
                                               int64_t block_rows, bool keep_pre, bool own) {
  const MlpShape s = check_mlp_args(op, x, w1, b1, w2, b2, approximate, block_rows);
  const at::TensorOptions opt = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty({s.M, s.N}, opt);
  at::Tensor pre = keep_pre ? at::empty({s.M, s.H}, opt) : at::Tensor();
  if (s.M > 0) {
    const int64_t R = block_rows > 0 ? block_rows : gelu_mlp_block_rows(s.H, x.element_size());
    forward_blocks(s, rows_of(x, s), w1, bias_or_zeros(b1, s.H, x), w2, b2, approximate == "tanh", R, y,
                   keep_pre ? &pre : nullptr, own);
  }
  return {y.view(with_last(x.sizes(), s.N)), pre};
}

}  // namespace

at::Tensor gelu_mlp_cpu(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                        const at::Tensor& w2, const std::optional<at::Tensor>& b2, c10::string_view approximate,
                        int64_t block_rows, bool own_gemm) {
  return std::get<0>(
      run_forward("gelu_mlp", x, w1, b1, w2, b2, approximate, block_rows, /*keep_pre=*/false, own_gemm));
}

// Training: also returns pre = x W1^T (M, H) (the fc1 GEMM's output before its bias), which gelu_mlp_backward reads.
// The GELU's output is never stored (the backward recomputes it block by block).
std::tuple<at::Tensor, at::Tensor> gelu_mlp_train_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                      const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                      const std::optional<at::Tensor>& b2,
                                                      c10::string_view approximate, int64_t block_rows,
                                                      bool own_gemm) {
  return run_forward("gelu_mlp_train", x, w1, b1, w2, b2, approximate, block_rows, /*keep_pre=*/true, own_gemm);
}

// Gradients of gelu_mlp_train, block by block, nothing (M, H)-sized written: for R rows, h = gelu(pre + b1)
// (recomputed), grad_W2 += g^T h, grad_hidden = g W2, grad_pre = grad_hidden * gelu'(pre + b1) (in place, with its
// column sums into grad_b1), grad_x = grad_pre W1, grad_W1 += grad_pre^T x. The weight and bias gradients are summed
// per thread (in the compute type for the weights, in double for the biases) and the threads' partials added in
// thread order: deterministic for a given thread count. Returns (grad_x, grad_w1, grad_b1, grad_w2, grad_b2); the
// bias gradients are computed whether or not the biases exist (a b1 of None reads as zeros).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_mlp_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& pre, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, c10::string_view approximate, int64_t block_rows,
    bool own_gemm) {
  const char* op = "gelu_mlp_backward";
  const MlpShape s = check_mlp_args(op, x, w1, b1, w2, std::nullopt, approximate, block_rows);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(with_last(x.sizes(), s.N)) && grad.scalar_type() == x.scalar_type(),
              op, ": grad must be ", x.scalar_type(), " ", with_last(x.sizes(), s.N), " (x's rows, w2's rows), got ",
              grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK(pre.sizes() == at::IntArrayRef({s.M, s.H}) && pre.scalar_type() == x.scalar_type(), op,
              ": pre must be gelu_mlp_train's ", x.scalar_type(), " (", s.M, ", ", s.H, "), got ", pre.scalar_type(),
              " ", pre.sizes());
  TORCH_CHECK(grad.device() == x.device() && pre.device() == x.device(), op, ": grad and pre must be on x's device");
  const at::TensorOptions opt = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_x = at::empty({s.M, s.C}, opt);
  const int64_t threads = at::get_num_threads();
  at::Tensor acc_w1 = at::zeros({threads, s.H, s.C}, opt), acc_w2 = at::zeros({threads, s.N, s.H}, opt);
  std::vector<double> acc_b1(threads * s.H, 0.0), acc_b2(threads * s.N, 0.0);
  if (s.M > 0) {
    const at::Tensor xc = rows_of(x, s), gc = grad.detach().contiguous().view({s.M, s.N});
    const at::Tensor pc = pre.detach().contiguous(), bias1 = bias_or_zeros(b1, s.H, x);
    const bool tanh_approx = approximate == "tanh";
    const at::Tensor w1d = w1.detach(), w2d = w2.detach();
    std::vector<at::Tensor> dw1s, dw2s;  // the threads' accumulators, as views made here (not on the workers)
    for (int64_t t = 0; t < threads; ++t) {
      dw1s.push_back(acc_w1[t]);
      dw2s.push_back(acc_w2[t]);
    }
    // two (R, H) buffers per task (h and the hidden gradient) beside the weights and their gradients: half the
    // forward's block
    const int64_t R =
        block_rows > 0 ? block_rows : std::max<int64_t>(16, gelu_mlp_block_rows(s.H, x.element_size()) / 2);
    const int64_t blocks = (s.M + R - 1) / R;
    const Isa isa = selected_isa();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vitkernels_gelu_mlp_backward_cpu", [&] {
      const scalar_t* b1_ptr = bias1.const_data_ptr<scalar_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid < threads, op, ": thread ", tid, " beyond the ", threads, " expected");
        at::Tensor h = at::empty({std::min(R, s.M), s.H}, opt), gh = at::empty({std::min(R, s.M), s.H}, opt);
        at::Tensor& dw1 = dw1s[tid];
        at::Tensor& dw2 = dw2s[tid];
        std::vector<scalar_t> db1(s.H);
        double* sum_b1 = acc_b1.data() + tid * s.H;
        double* sum_b2 = acc_b2.data() + tid * s.N;
        for (int64_t blk = first; blk < last; ++blk) {
          const int64_t r0 = blk * R, rows = std::min(R, s.M - r0);
          const at::Tensor xb = xc.narrow(0, r0, rows), gb = gc.narrow(0, r0, rows), pb = pc.narrow(0, r0, rows);
          at::Tensor hb = h.narrow(0, 0, rows), ghb = gh.narrow(0, 0, rows), gxb = grad_x.narrow(0, r0, rows);
          const scalar_t* pre_ptr = pb.const_data_ptr<scalar_t>();
          VK_CPU_CALL(isa, bias_gelu_rows, pre_ptr, b1_ptr, hb.mutable_data_ptr<scalar_t>(), int64_t{0}, rows, s.H,
                      tanh_approx);
          block_mm(own_gemm, dw2, gb.t(), hb, std::nullopt, true);  // grad_W2 += g^T h
          const scalar_t* g_ptr = gb.const_data_ptr<scalar_t>();
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t n = 0; n < s.N; ++n) sum_b2[n] += static_cast<double>(g_ptr[r * s.N + n]);
          block_mm(own_gemm, ghb, gb, w2d, std::nullopt, false);  // grad_hidden = g W2
          scalar_t* gh_ptr = ghb.mutable_data_ptr<scalar_t>();
          std::fill(db1.begin(), db1.end(), scalar_t(0));
          VK_CPU_CALL(isa, bias_gelu_backward_rows, gh_ptr, pre_ptr, b1_ptr, gh_ptr, db1.data(), int64_t{0}, rows,
                      s.H, tanh_approx);
          for (int64_t j = 0; j < s.H; ++j) sum_b1[j] += static_cast<double>(db1[j]);
          block_mm(own_gemm, gxb, ghb, w1d, std::nullopt, false);  // grad_x = grad_pre W1
          block_mm(own_gemm, dw1, ghb.t(), xb, std::nullopt, true);  // grad_W1 += grad_pre^T x
        }
      });
    });
  }
  std::vector<double> b1_total(s.H, 0.0), b2_total(s.N, 0.0);
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t j = 0; j < s.H; ++j) b1_total[j] += acc_b1[t * s.H + j];
    for (int64_t n = 0; n < s.N; ++n) b2_total[n] += acc_b2[t * s.N + n];
  }
  const auto to_tensor = [&](const std::vector<double>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, x.options().dtype(at::kDouble));
    std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
    return t.to(x.scalar_type());
  };
  return {grad_x.view(x.sizes()), acc_w1.sum(0), to_tensor(b1_total), acc_w2.sum(0), to_tensor(b2_total)};
}

// --- gelu_mlp_eager: unblocked, the GELU in the own GEMM's epilogues ------------------------------------------------

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// out (M, N) = a (M, K) b^T [+ bias] for a 2D `a` and a (N, K) weight `w`, any strides (the GEMM reads them in
// place), through vitkernels' own GEMM with the epilogue `ep`; out contiguous, row stride N.
void own_product(const at::Tensor& a, const at::Tensor& w, const float* bias, at::Tensor& out,
                 const GemmEpilogue& ep = GemmEpilogue{}) {
  gemm_f32(a.size(0), w.size(0), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
           w.const_data_ptr<float>(), w.stride(1), w.stride(0), out.mutable_data_ptr<float>(), out.size(1), bias,
           false, ep);
}

// h (M, H) = gelu(x2 W1^T + b1), the GELU in fc1's GEMM epilogue; with pre, also pre (M, H) = x2 W1^T + b1.
at::Tensor fc1_gelu(const at::Tensor& x2, const at::Tensor& w1, const at::Tensor& b1c, bool tanh_approx,
                    at::Tensor* pre) {
  const at::TensorOptions opt = x2.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor h = at::empty({x2.size(0), w1.size(0)}, opt);
  GemmEpilogue ep;
  ep.gelu = true;
  ep.tanh = tanh_approx;
  if (pre != nullptr) {
    *pre = at::empty({x2.size(0), w1.size(0)}, opt);
    ep.side = pre->mutable_data_ptr<float>();
    ep.ld_side = w1.size(0);
  }
  own_product(x2, w1, b1c.defined() ? b1c.const_data_ptr<float>() : nullptr, h, ep);
  return h;
}

// y (..., N) = h W2^T + b2: allocated in x's leading shape (not a view of a tensor made here: autograd would forbid
// modifying it in place afterwards).
at::Tensor fc2(const at::Tensor& h, const at::Tensor& w2, const at::Tensor& b2c, const at::Tensor& x) {
  at::Tensor y = at::empty(with_last(x.sizes(), w2.size(0)), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor y2 = y.view({h.size(0), w2.size(0)});
  own_product(h, w2, b2c.defined() ? b2c.const_data_ptr<float>() : nullptr, y2);
  return y;
}

// (grad_pre (M, H), its column sums (H)): grad_pre = (g W2) * gelu'(pre) for g (M, N), W2 (N, H) and pre (M, H)
// contiguous, the GELU's derivative applied and b1's gradient summed as the GEMM stores its tiles.
std::tuple<at::Tensor, at::Tensor> grad_through_gelu(const at::Tensor& g, const at::Tensor& w2, const at::Tensor& pre,
                                                     bool tanh_approx) {
  const int64_t M = pre.size(0), H = pre.size(1), N = w2.size(0);
  at::Tensor grad_pre = at::empty({M, H}, pre.options());
  at::Tensor sums = at::empty({H}, pre.options());
  GemmEpilogue ep;
  ep.gelu = ep.grad = true;
  ep.tanh = tanh_approx;
  ep.side = const_cast<float*>(pre.const_data_ptr<float>());  // read only (a grad epilogue)
  ep.ld_side = H;
  ep.col_sums = sums.mutable_data_ptr<float>();
  gemm_f32(M, H, N, g.const_data_ptr<float>(), g.stride(0), g.stride(1), w2.const_data_ptr<float>(), w2.stride(0),
           w2.stride(1), grad_pre.mutable_data_ptr<float>(), H, nullptr, false, ep);
  return {grad_pre, sums};
}

// check_mlp_args, and x float32 on the CPU: the operands of the unblocked ops on vitkernels' own GEMM
// (gelu_mlp_eager, gelu_mlp_own).
MlpShape check_own_mlp_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                            const std::optional<at::Tensor>& b2, c10::string_view approximate) {
  const MlpShape s = check_mlp_args(op, x, w1, b1, w2, b2, approximate, 0);
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32 (vitkernels' own GEMM), got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  return s;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->detach().contiguous() : at::Tensor();
}

// Called by gelu_mlp_eager only, after its argument checks: M, C are x's rows and width as they found them.
struct EagerGeluMlp : public torch::autograd::Function<EagerGeluMlp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                            const std::optional<at::Tensor>& b2, c10::string_view approximate, int64_t M, int64_t C) {
    const at::Tensor x2 = x.reshape({M, C});
    at::Tensor pre;
    const at::Tensor h = fc1_gelu(x2, w1, contiguous_or_undefined(b1), approximate == "tanh", &pre);
    // the inputs through save_for_backward (version-checked: an in-place change before the backward raises; b1
    // undefined where absent); pre and h are this Function's own
    ctx->save_for_backward({x, w1, w2, b1.has_value() ? *b1 : at::Tensor()});
    ctx->saved_data["pre"] = pre;
    ctx->saved_data["h"] = h;
    ctx->saved_data["has_b2"] = b2.has_value();
    ctx->saved_data["tanh"] = approximate == "tanh";
    return fc2(h, w2, contiguous_or_undefined(b2), x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w1 = saved[1], &w2 = saved[2], &b1 = saved[3];
    const at::Tensor pre = ctx->saved_data["pre"].toTensor(), h = ctx->saved_data["h"].toTensor();
    const bool has_b1 = b1.defined(), has_b2 = ctx->saved_data["has_b2"].toBool();
    const bool tanh_approx = ctx->saved_data["tanh"].toBool();
    const int64_t M = pre.size(0), C = w1.size(1), N = w2.size(0);
    const at::Tensor g = grads[0].reshape({M, N});
    const at::Tensor x2 = x.reshape({M, C});
    // needs_input_grad counts the tensor inputs given (an absent bias has no edge); the returned list, every argument
    const bool need_x = ctx->needs_input_grad(0), need_w1 = ctx->needs_input_grad(1);
    const bool need_b1 = has_b1 && ctx->needs_input_grad(2), need_w2 = ctx->needs_input_grad(has_b1 ? 3 : 2);
    const bool need_b2 = has_b2 && ctx->needs_input_grad(has_b1 ? 4 : 3);
    const bool need_pre = need_x || need_w1 || need_b1;
    at::Tensor grad_x, grad_w1, grad_b1, grad_w2, grad_b2;
    if (at::GradMode::is_enabled()) {
      // create_graph: differentiable ATen ops, fc1 recomputed from the inputs (pre and h are not in the graph)
      const c10::string_view approx = tanh_approx ? "tanh" : "none";
      const at::Tensor pre_d = at::linear(x2, w1, has_b1 ? std::optional<at::Tensor>(b1) : std::nullopt);
      const at::Tensor grad_pre = at::gelu_backward(at::mm(g, w2), pre_d, approx);
      if (need_x) grad_x = at::mm(grad_pre, w1).view(x.sizes());
      if (need_w1) grad_w1 = at::mm(grad_pre.t(), x2);
      if (need_b1) grad_b1 = grad_pre.sum(0);
      if (need_w2) grad_w2 = at::mm(g.t(), at::gelu(pre_d, approx));
    } else {
      if (need_w2) grad_w2 = gemm_f32(g.t(), h, std::nullopt, "gelu_mlp_eager backward");
      if (need_pre) {
        at::Tensor grad_pre, sums;
        std::tie(grad_pre, sums) = grad_through_gelu(g, w2, pre, tanh_approx);
        if (need_x) grad_x = gemm_f32(grad_pre, w1, std::nullopt, "gelu_mlp_eager backward").view(x.sizes());
        if (need_w1) grad_w1 = gemm_f32(grad_pre.t(), x2, std::nullopt, "gelu_mlp_eager backward");
        if (need_b1) grad_b1 = sums;
      }
    }
    if (need_b2) grad_b2 = g.sum(0);
    return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// y = gelu(x W1^T + b1) W2^T + b2, float32 CPU, unblocked on vitkernels' own GEMM (the header comment); records for
// autograd where autograd is recording, else runs the forward alone (no pre-activation kept).
at::Tensor gelu_mlp_eager(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                          const at::Tensor& w2, const std::optional<at::Tensor>& b2, c10::string_view approximate) {
  const MlpShape s = check_own_mlp_args("gelu_mlp_eager", x, w1, b1, w2, b2, approximate);
  if (records_autograd(x, w1, b1, w2, b2)) return EagerGeluMlp::apply(x, w1, b1, w2, b2, approximate, s.M, s.C);
  const at::Tensor h = fc1_gelu(x.reshape({s.M, s.C}), w1, contiguous_or_undefined(b1), approximate == "tanh",
                                nullptr);
  return fc2(h, w2, contiguous_or_undefined(b2), x);
}

// gelu_mlp_own: the same forward as an op with its tensors out, for torch.compile's graphs (where a C++ autograd
// Function cannot be traced; autograd: vitkernels/ops/gelu_mlp.py) -> (y (..., N), h (M, H) = gelu(x W1^T + b1), the
// pre-activation (M, H) with keep_pre, else an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_mlp_own_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                                const std::optional<at::Tensor>& b1,
                                                                const at::Tensor& w2,
                                                                const std::optional<at::Tensor>& b2,
                                                                c10::string_view approximate, bool keep_pre) {
  const MlpShape s = check_own_mlp_args("gelu_mlp_own", x, w1, b1, w2, b2, approximate);
  at::Tensor pre;
  const at::Tensor h = fc1_gelu(x.reshape({s.M, s.C}), w1, contiguous_or_undefined(b1), approximate == "tanh",
                                keep_pre ? &pre : nullptr);
  if (!keep_pre) pre = at::empty({0}, h.options());
  return {fc2(h, w2, contiguous_or_undefined(b2), x), h, pre};
}

// gelu_mlp_own's backward through the GELU: grad (..., N) of y, W2 (N, H), pre (M, H) as gelu_mlp_own kept it ->
// (grad_pre = (grad W2) * gelu'(pre) (M, H), b1's gradient (H)).
std::tuple<at::Tensor, at::Tensor> gelu_mlp_own_grad_pre_cpu(const at::Tensor& grad, const at::Tensor& w2,
                                                             const at::Tensor& pre, c10::string_view approximate) {
  const char* op = "gelu_mlp_own_grad_pre";
  TORCH_CHECK(approximate == "none" || approximate == "tanh", op, ": approximate must be 'none' or 'tanh', got '",
              std::string(approximate), "'");
  TORCH_CHECK(pre.dim() == 2 && pre.scalar_type() == at::kFloat && pre.is_contiguous(), op,
              ": pre must be a contiguous float32 (M, H) tensor, got ", pre.scalar_type(), " ", pre.sizes());
  const int64_t M = pre.size(0), H = pre.size(1);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == H && w2.scalar_type() == at::kFloat, op,
              ": w2 must be a float32 (N, ", H, ") tensor, got ", w2.scalar_type(), " ", w2.sizes());
  const int64_t N = w2.size(0);
  TORCH_CHECK(grad.dim() >= 1 && grad.size(-1) == N && grad.numel() == M * N && grad.scalar_type() == at::kFloat, op,
              ": grad must be a float32 (..., ", N, ") tensor of ", M, " rows, got ", grad.scalar_type(), " ",
              grad.sizes());
  TORCH_CHECK(grad.device() == pre.device() && w2.device() == pre.device(), op,
              ": grad, w2 and pre must be on one device, got ", grad.device(), ", ", w2.device(), ", ",
              pre.device());
  return grad_through_gelu(grad.reshape({M, N}), w2, pre, approximate == "tanh");
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("gelu_mlp_own", &gelu_mlp_own_cpu);
  m.impl("gelu_mlp_own_grad_pre", &gelu_mlp_own_grad_pre_cpu);
  m.impl("gelu_mlp", &gelu_mlp_cpu);
  m.impl("gelu_mlp_train", &gelu_mlp_train_cpu);
  m.impl("gelu_mlp_backward", &gelu_mlp_backward_cpu);
}

TORCH_LIBRARY_IMPL(vitkernels, CompositeImplicitAutograd, m) {
  m.impl("gelu_mlp_eager", &gelu_mlp_eager);
}

}  // namespace cpu
}  // namespace vitkernels
