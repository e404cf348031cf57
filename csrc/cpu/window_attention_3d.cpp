// 3D (volumetric / video) shifted-window attention on CPU, fused: from the qkv Linear's output in original
// (B, D, H, W) token order to the attention output in original order (semantics:
// vitkernels/reference/window_attention_3d.py; MONAI SwinUNETR, Video Swin), forward and backward.
//
// The 2D op's kernel, unchanged: window_attention_kernel.h's (window, head) items are generic over the window
// addressing, and here get WindowGeometry3D (csrc/include/vitkernels/window_geometry_3d.h: per-axis shift and
// padding in either order, windows depth-major, 27 mask regions from padded coordinates, the 3D relative position
// index). Each item gathers its head's q, k, v slices of the window's N = wd*wh*ww tokens by index math into the
// thread's zero-padded scratch (sized from N: 343 tokens for MONAI's 7x7x7 windows), runs the register-tiled GEMMs
// and softmax there, and stores the output slices back at their tokens; the backward recomputes P from the saved
// log-sum-exp. The host side (window_attention_run.h) is the 2D op's: bias expanded once per call into (nH, N, N)
// rows, per-thread bias-gradient sums reduced in double. Compiled for AVX-512, AVX2 and the baseline
// (VITKERNELS_CPU_ISA caps the choice).
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vitkernels/window_attention_3d_args.h"
#include "vitkernels/window_geometry_3d.h"
#include "window_attention_cpu.h"
#include "window_attention_host.h"

// --- the kernel body, once per instruction set (the 2D op's, instantiated here with WindowGeometry3D) ---------------
#define VK_CPU_BODY "window_attention_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY

#include "window_attention_run.h"

namespace vitkernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> window_attention_3d_cpu(const at::Tensor& qkv_in, const at::Tensor& table,
                                                           const std::optional<at::Tensor>& qkv_bias,
                                                           at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                           int64_t num_heads, double scale, bool pad_before_shift) {
  const WindowAttention3DProblem p = check_window_attention_3d_args("window_attention_3d", qkv_in, table, qkv_bias,
                                                                    window_size, shift_size, num_heads,
                                                                    pad_before_shift);
  const at::Tensor qkv = qkv_in.contiguous();
  return window_attention_run::run_forward(p, qkv, table, window_attention_pad_row(qkv, qkv_bias), scale,
                                           /*bias_every_token=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_3d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv_in, const at::Tensor& table,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out, const at::Tensor& lse,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, int64_t num_heads, double scale, bool pad_before_shift) {
  const char* op = "window_attention_3d_backward";
  const WindowAttention3DProblem p =
      check_window_attention_3d_args(op, qkv_in, table, qkv_bias, window_size, shift_size, num_heads, pad_before_shift);
  check_window_attention_3d_backward_args(op, p, qkv_in, grad_out, out, lse);
  return window_attention_run::run_backward(op, p, grad_out, qkv_in.contiguous(), table, qkv_bias, lse, scale,
                                            /*bias_every_token=*/false);
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("window_attention_3d", &window_attention_3d_cpu);
  m.impl("window_attention_3d_backward", &window_attention_3d_backward_cpu);
}

}  // namespace cpu
}  // namespace vitkernels
