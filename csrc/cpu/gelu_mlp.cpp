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
// the GEMM library's own row-blocking choices. No autograd here: vitkernels/ops/gelu_mlp.py registers a backward
// that recomputes the hidden activation (the op never stores it).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "row_ops.h"

#define VK_CPU_BODY "bias_gelu_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY

namespace vitkernels {
namespace cpu {
namespace {

// Bytes of the per-task hidden block: well inside a 1-2 MB L2 beside the block's input and output rows.
constexpr int64_t kHiddenBlockBytes = 512 * 1024;

void check_param(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x, at::IntArrayRef shape) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == shape, "gelu_mlp: ", name, " must be ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "gelu_mlp: ", name, " must be ", x.scalar_type(), " like x, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), "gelu_mlp: ", name, " must be on x's device ", x.device(), ", got ",
              t->device());
}

}  // namespace

int64_t gelu_mlp_block_rows(int64_t hidden, int64_t element_bytes) {
  const int64_t rows = kHiddenBlockBytes / std::max<int64_t>(1, hidden * element_bytes);
  return std::max<int64_t>(16, rows / 16 * 16);
}

at::Tensor gelu_mlp_cpu(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                        const at::Tensor& w2, const std::optional<at::Tensor>& b2, c10::string_view approximate,
                        int64_t block_rows) {
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "gelu_mlp: x must be a float32 or float64 (..., C) tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "gelu_mlp: approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
  TORCH_CHECK(block_rows >= 0, "gelu_mlp: block_rows must be >= 0 (0: chosen from the hidden width), got ",
              block_rows);
  const int64_t C = x.size(-1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, "gelu_mlp: w1 must be (H, ", C, "), got ", w1.sizes());
  const int64_t H = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == H, "gelu_mlp: w2 must be (N, ", H, "), got ", w2.sizes());
  const int64_t N = w2.size(0);
  check_param("w1", w1, x, {H, C});
  check_param("w2", w2, x, {N, H});
  check_param("b1", b1, x, {H});
  check_param("b2", b2, x, {N});

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  int64_t M = 1;  // the product of the leading dims (not numel / C: C may be 0)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return y.view(out_shape);

  const at::Tensor xc = x.contiguous().view({M, C});
  const at::Tensor w1t = w1.t(), w2t = w2.t();  // (C, H), (H, N) views: the GEMM reads them transposed
  // gelu(h + 0) is gelu(h) for every h (-0 aside): without b1 the row kernel adds zeros
  const at::Tensor bias1 = b1.has_value() ? b1->contiguous() : at::zeros({H}, x.options());
  const bool tanh_approx = approximate == "tanh";
  const int64_t R = block_rows > 0 ? block_rows : gelu_mlp_block_rows(H, x.element_size());
  const int64_t blocks = (M + R - 1) / R;
  const Isa isa = selected_isa();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vitkernels_gelu_mlp_cpu", [&] {
    const scalar_t* b1_ptr = bias1.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      // Inside a parallel region ATen's GEMM runs on this thread only. The at::cpu:: functions are the CPU kernels
      // themselves (no dispatcher, hence no autograd on a worker thread whose grad mode is its own).
      at::Tensor h = at::empty({std::min(R, M), H}, xc.options());
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t r0 = blk * R, rows = std::min(R, M - r0);
        at::Tensor hb = h.narrow(0, 0, rows);
        at::cpu::mm_out(hb, xc.narrow(0, r0, rows), w1t);
        scalar_t* h_ptr = hb.mutable_data_ptr<scalar_t>();
        VK_CPU_CALL(isa, bias_gelu_rows, h_ptr, b1_ptr, h_ptr, int64_t{0}, rows, H, tanh_approx);
        at::Tensor yb = y.narrow(0, r0, rows);
        if (b2.has_value()) {
          at::cpu::addmm_out(yb, *b2, hb, w2t);  // as F.linear: the bias added by the GEMM (beta = 1)
        } else {
          at::cpu::mm_out(yb, hb, w2t);
        }
      }
    });
  });
  return y.view(out_shape);
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) { m.impl("gelu_mlp", &gelu_mlp_cpu); }

}  // namespace cpu
}  // namespace vitkernels
