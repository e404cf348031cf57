// torch binding of the CUDA Swin V2 window attention kernels (launch API: window_attention_v2.cuh; same op schemas,
// argument checks and outputs as csrc/cpu/window_attention_v2.cpp).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "torch_cuda_types.h"
#include "vitkernels/window_attention_args.h"
#include "window_attention_v2.cuh"

namespace vitkernels {
namespace {

using Problem = WindowAttentionProblem;

// V1's shared checks (vitkernels/window_attention_args.h), the (nH,) scale, CUDA tensors and the kernels' limits.
Problem check_problem(const char* op, const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& scale,
                      const std::optional<at::Tensor>& qkv_bias, at::IntArrayRef window_size,
                      at::IntArrayRef shift_size, int64_t num_heads) {
  const Problem p = check_window_attention_args(op, qkv, table, qkv_bias, window_size, shift_size, num_heads);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == num_heads, op, ": scale must be (", num_heads, "), got ",
              scale.sizes());
  check_same_device(op, qkv, scale, "scale");
  TORCH_CHECK(qkv.is_cuda(), op, ": qkv must be a CUDA tensor, got ", qkv.device());
  TORCH_CHECK(p.N <= cuda::kWindowAttentionMaxTokens, op, ": the CUDA kernel supports windows of at most ",
              cuda::kWindowAttentionMaxTokens, " tokens, got ", window_size[0], " x ", window_size[1], " = ", p.N);
  TORCH_CHECK(p.hd <= cuda::kWindowAttentionMaxHeadDim, op, ": the CUDA kernel supports head_dim <= ",
              cuda::kWindowAttentionMaxHeadDim, ", got ", p.hd);
  TORCH_CHECK(p.nH <= 65535, op, ": the CUDA kernel supports at most 65535 heads, got ", p.nH);
  TORCH_CHECK(p.windows() <= INT32_MAX, op, ": too many windows for one launch: ", p.windows());
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_v2_cuda(const at::Tensor& qkv_in, const at::Tensor& table,
                                                            const at::Tensor& scale,
                                                            const std::optional<at::Tensor>& qkv_bias,
                                                            at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                            int64_t num_heads) {
  const Problem p =
      check_problem("window_attention_v2", qkv_in, table, scale, qkv_bias, window_size, shift_size, num_heads);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  const auto acc = window_attention_acc_type(qkv);
  at::Tensor out = at::empty(p.out_shape(), qkv.options());
  at::Tensor lse = at::empty({p.windows(), p.nH, p.N}, qkv.options().dtype(acc));
  if (p.windows() == 0) return {out, lse};
  const at::Tensor tab = table.to(acc).contiguous();
  const at::Tensor tau = scale.to(acc).contiguous();
  const auto shape = cuda::make_window_attention_shape(p.g, p.nH, p.hd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "vitkernels_window_attention_v2_cuda",
                                  [&] {
    using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
    C10_CUDA_CHECK(cuda::launch_window_attention_v2_fwd(cptr<scalar_t>(qkv), cptr<scalar_t>(pad_row),
                                                        tab.const_data_ptr<acc_t>(), tau.const_data_ptr<acc_t>(),
                                                        mptr<scalar_t>(out), lse.mutable_data_ptr<acc_t>(), shape,
                                                        at::cuda::getCurrentCUDAStream()));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_v2_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& table, const at::Tensor& scale,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, int64_t num_heads) {
  const char* op = "window_attention_v2_backward";
  const Problem p = check_problem(op, qkv_in, table, scale, qkv_bias, window_size, shift_size, num_heads);
  check_window_attention_backward_args(op, p, qkv_in, grad_out_in, out_in, lse_in);
  const auto acc = window_attention_acc_type(qkv_in);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor out = out_in.to(qkv.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor pad_row = window_attention_pad_row(qkv, qkv_bias);
  at::Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());  // every real token's row is written
  at::Tensor grad_table = at::zeros(table.sizes(), table.options().dtype(at::kDouble));
  at::Tensor grad_scale = at::zeros({p.nH}, scale.options().dtype(at::kDouble));
  at::Tensor d_pad_sum = at::zeros({p.nH, 2, p.hd}, qkv.options().dtype(at::kDouble));
  if (p.windows() > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor tab = table.to(acc).contiguous();
    const at::Tensor tau = scale.to(acc).contiguous();
    const auto shape = cuda::make_window_attention_shape(p.g, p.nH, p.hd);
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t per_group = cuda::window_attention_windows_per_group(p.windows(), p.nH, 4 * sms);
    const int64_t groups = cuda::window_attention_groups(p.windows(), per_group);
    const int64_t chunks = cuda::window_attention_blocks(shape).chunks;
    at::Tensor delta = at::empty({p.windows(), p.nH, p.N}, qkv.options().dtype(acc));
    at::Tensor d_scale = at::empty({p.windows(), p.nH, chunks}, qkv.options().dtype(acc));
    at::Tensor d_bias = at::zeros({groups, p.nH, p.N, p.N}, qkv.options().dtype(acc));
    at::Tensor d_pad = at::empty({cuda::window_attention_pad_partials(shape, per_group), p.nH, 2, p.hd},
                                 qkv.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(),
                                    "vitkernels_window_attention_v2_bwd_cuda", [&] {
      using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
      C10_CUDA_CHECK(cuda::launch_window_attention_v2_bwd(
          cptr<scalar_t>(grad_out), cptr<scalar_t>(qkv), cptr<scalar_t>(pad_row), tab.const_data_ptr<acc_t>(),
          tau.const_data_ptr<acc_t>(), cptr<scalar_t>(out), lse.const_data_ptr<acc_t>(),
          delta.mutable_data_ptr<acc_t>(), mptr<scalar_t>(grad_qkv), d_scale.mutable_data_ptr<acc_t>(),
          d_bias.mutable_data_ptr<acc_t>(), d_pad.mutable_data_ptr<acc_t>(), shape, per_group, stream));
    });
    // Sums in double, in a fixed order; the table gradient is V1's scatter by relative position.
    const at::Tensor d_bias_sum = at::sum(d_bias, {0}, /*keepdim=*/false, at::kDouble).contiguous();  // (nH, N, N)
    C10_CUDA_CHECK(cuda::launch_window_attention_bias_grad(d_bias_sum.const_data_ptr<double>(),
                                                           grad_table.mutable_data_ptr<double>(), p.g.wh, p.g.ww,
                                                           p.nH, stream));
    grad_scale = at::sum(d_scale, {0, 2}, /*keepdim=*/false, at::kDouble);
    d_pad_sum = at::sum(d_pad, {0}, /*keepdim=*/false, at::kDouble);
  }
  at::Tensor grad_bias = at::empty({0}, qkv.options());
  if (qkv_bias.has_value()) {
    const at::Tensor k_part = d_pad_sum.select(1, 0).reshape({p.C});
    const at::Tensor v_part = d_pad_sum.select(1, 1).reshape({p.C});
    grad_bias = at::cat({at::zeros({p.C}, k_part.options()), k_part, v_part}).to(qkv_bias->scalar_type());
  }
  return {grad_qkv, grad_table.to(table.scalar_type()), grad_scale.to(scale.scalar_type()), grad_bias};
}

TORCH_LIBRARY_IMPL(vitkernels, CUDA, m) {
  m.impl("window_attention_v2", &window_attention_v2_cuda);
  m.impl("window_attention_v2_backward", &window_attention_v2_backward_cuda);
}

}  // namespace vitkernels
