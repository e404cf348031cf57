// Schemas of every op in vitkernels._C. Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake (meta) implementations and autograd are registered from Python in vitkernels/ops/<op>.py, except the autograd
// of onednn_linear_eager (a C++ autograd Function, csrc/cpu/linear.cpp) and of the in-place inference variants (at
// the end of this file). tests/test_native_safety.py checks that every op has an autograd kernel.
//
// Every kernel validates the arguments it relies on itself (TORCH_CHECK, naming the argument): the ops are reachable
// without the Python checks, from torch.compile'd code and as torch.ops.vitkernels.<name>. Shared checks:
// csrc/include/vitkernels/window_attention_args.h (window ops) and masking_args.h (masking ops).
#include <Python.h>
// at::AutoDispatchBelowADInplaceOrView: included by name, torch 2.11's other headers do not bring it in
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>

// `import vitkernels._C` loads this shared library, which runs the registrations below; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "vitkernels C++/CUDA ops: see torch.ops.vitkernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace vitkernels {

namespace cpu {
std::string window_attention_cpu_isa();  // csrc/cpu/window_attention.cpp
}

// Semicolon-separated key=value pairs describing the build, read by vitkernels.info.
std::string build_info() {
  std::string info;
#ifdef VITKERNELS_WITH_CUDA
  info += "cuda=1;";
#else
  info += "cuda=0;";
#endif
#ifdef _OPENMP
  info += "openmp=" + std::to_string(_OPENMP) + ";";
#else
  info += "openmp=0;";
#endif
#if defined(__clang__)
  info += "compiler=clang " __clang_version__ ";";
#elif defined(__GNUC__)
  info += "compiler=gcc " __VERSION__ ";";
#endif
#ifdef VITKERNELS_CUDA_ARCH_LIST
  info += "cuda_arch=" VITKERNELS_CUDA_ARCH_LIST ";";
#endif
  info += "cpu_isa=" + cpu::window_attention_cpu_isa() + ";";  // the CPU kernels' instruction set, chosen at run time
  return info;
}

}  // namespace vitkernels

TORCH_LIBRARY(vitkernels, m) {
  m.def("build_info() -> str", &vitkernels::build_info);

  // x (B, H, W, C) -> windows (B * nWh * nWw, wh * ww, C): roll by -shift, zero-pad to whole windows, partition.
  // 0 <= shift < window; a window (and so a shift) may be larger than the map: the roll is by shift mod H, W.
  m.def("window_partition(Tensor x, int[2] window_size, int[2] shift_size) -> Tensor");
  // windows (B * nWh * nWw, wh * ww, C) -> (B, height, width, C): the inverse (crop padding, roll by +shift).
  m.def("window_reverse(Tensor windows, int height, int width, int[2] window_size, int[2] shift_size) -> Tensor");

  // Swin shifted-window attention, qkv (B, H, W, 3C) in original token order -> (out (B, H, W, C), the softmax state
  // for the backward: the row log-sum-exp (B * nW, nH, N), fp32 or fp64 for fp64 inputs, or with save_probs (CPU
  // only: training, where the backward then reads the softmax instead of recomputing it) the softmax itself
  // (B * nW, nH, N, NP), as window_attention_add_bias below). The Triton custom op triton_window_attention has the
  // same first seven arguments (its eighth is need_lse).
  m.def("window_attention(Tensor qkv, Tensor table, Tensor? qkv_bias, int[2] window_size, int[2] shift_size, "
        "int num_heads, float scale, bool save_probs=False) -> (Tensor, Tensor)");
  // Gradients of qkv, table and qkv_bias (an empty tensor when there is no qkv_bias); lse: the forward's softmax
  // state as it came (the lse, or on CPU the saved softmax).
  m.def("window_attention_backward(Tensor grad_out, Tensor qkv, Tensor table, Tensor? qkv_bias, Tensor out, "
        "Tensor lse, int[2] window_size, int[2] shift_size, int num_heads, float scale) -> (Tensor, Tensor, Tensor)");
  // The same with qkv the qkv Linear's output *without* its bias, which the op adds to every token (CPU): the Linear
  // runs as a plain GEMM, with no broadcast copy of the bias. The backward's third output is the bias's gradient.
  // The forward's second output is the softmax state for the backward: the row log-sum-exp (B * nW, nH, N), or with
  // save_probs (training) the softmax itself (B * nW, nH, N, N), which the backward reads instead of recomputing.
  m.def("window_attention_add_bias(Tensor qkv, Tensor table, Tensor qkv_bias, int[2] window_size, int[2] shift_size, "
        "int num_heads, float scale, bool save_probs=False) -> (Tensor, Tensor)");
  m.def("window_attention_add_bias_backward(Tensor grad_out, Tensor qkv, Tensor table, Tensor qkv_bias, Tensor out, "
        "Tensor softmax_state, int[2] window_size, int[2] shift_size, int num_heads, float scale) -> "
        "(Tensor, Tensor, Tensor)");
  // The attention output of window_attention_add_bias, recorded for autograd by a C++ autograd Function (the softmax
  // saved) where autograd is recording: the fused Swin block's eager path (csrc/cpu/window_attention.cpp;
  // torch.compile keeps the op above).
  m.def("window_attention_add_bias_eager(Tensor qkv, Tensor table, Tensor qkv_bias, int[2] window_size, "
        "int[2] shift_size, int num_heads, float scale) -> Tensor");

  // 3D (volumetric / video) shifted-window attention, qkv (B, D, H, W, 3C) in original token order -> (out
  // (B, D, H, W, C), row log-sum-exp (B * nW, nH, N), fp32 or fp64 for fp64 inputs); windows and shifts are
  // (d, h, w) triples, pad_before_shift picks MONAI's / Video Swin's order (pad, then roll) or timm's (roll, then
  // pad). CPU: csrc/cpu/window_attention_3d.cpp; CUDA: csrc/cuda/window_attention_3d.cpp.
  m.def("window_attention_3d(Tensor qkv, Tensor table, Tensor? qkv_bias, int[3] window_size, int[3] shift_size, "
        "int num_heads, float scale, bool pad_before_shift) -> (Tensor, Tensor)");
  // Gradients of qkv, table and qkv_bias (an empty tensor when there is no qkv_bias).
  m.def("window_attention_3d_backward(Tensor grad_out, Tensor qkv, Tensor table, Tensor? qkv_bias, Tensor out, "
        "Tensor lse, int[3] window_size, int[3] shift_size, int num_heads, float scale, bool pad_before_shift) "
        "-> (Tensor, Tensor, Tensor)");

  // x W^T + b through oneDNN's inner product, float32 CPU, recorded for autograd by a C++ autograd Function: the
  // eager training path of vitkernels.linear (csrc/cpu/linear.cpp; torch.compile keeps onednn_linear below).
  // forward_mm: the forward product through ATen's GEMM (MKL) instead, the backward the same.
  // own_gemm: all three products (forward and backward) through vitkernels' own GEMM (cpu_gemm below) instead.
  m.def("onednn_linear_eager(Tensor x, Tensor weight, Tensor? bias, bool grad_x_mm=False, bool forward_mm=False, "
        "bool own_gemm=False) -> Tensor");
  // a (..., K) @ b (K, N) [+ bias (N)], float32 CPU, any strides: vitkernels' own packed GEMM (csrc/cpu/gemm.cpp),
  // the products of onednn_linear_eager(own_gemm=True); fake and autograd from vitkernels/ops/linear.py.
  // flexible_layout: it reads any strides, so inductor passes its buffers and views as they are (its default for a
  // custom op, needs_exact_strides, copied them into eager's layouts: ~70 ms of copies per Swin-T b2 training step).
  m.def("cpu_gemm(Tensor a, Tensor b, Tensor? bias=None) -> Tensor", {at::Tag::flexible_layout});
  // act(x W^T + b), act in {none, gelu, gelu_tanh} as oneDNN's post-op, float32 CPU, no autograd of its own: the op
  // torch.compile keeps (fake and autograd from vitkernels/ops/linear.py; without vitkernels._C the same op is a
  // Python custom op there).
  m.def("onednn_linear(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor");

  // A transformer MLP, y = gelu(x W1^T + b1) W2^T + b2, x (..., C), w1 (H, C), w2 (N, H), float32 / float64 CPU, by
  // blocks of block_rows rows (0: chosen from H) so the hidden activation stays in cache (csrc/cpu/gelu_mlp.cpp;
  // fake and autograd from vitkernels/ops/gelu_mlp.py, whose backward recomputes the hidden activation). own_gemm:
  // the blocks' float32 GEMMs through vitkernels' own GEMM (cpu_gemm) instead of ATen's.
  m.def("gelu_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate, int block_rows=0, "
        "bool own_gemm=False) -> Tensor");
  // Training: -> (y, pre = x W1^T (M, H), the fc1 GEMM's rows before their bias); the backward reads pre and
  // recomputes the GELU block by block -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2).
  m.def("gelu_mlp_train(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate, "
        "int block_rows=0, bool own_gemm=False) -> (Tensor, Tensor)");
  m.def("gelu_mlp_backward(Tensor grad, Tensor x, Tensor pre, Tensor w1, Tensor? b1, Tensor w2, str approximate, "
        "int block_rows=0, bool own_gemm=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same MLP unblocked, float32 CPU, eager only (a C++ autograd Function, CompositeImplicitAutograd): its three
  // GEMMs per direction through vitkernels' own GEMM, bias + GELU in fc1's GEMM epilogue, gelu' and b1's gradient
  // in the epilogue of the backward's g W2 (csrc/cpu/gelu_mlp.cpp).
  m.def("gelu_mlp_eager(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate) -> Tensor");
  // Its forward and its GELU-backward GEMM as plain ops, for torch.compile's graphs (autograd and fakes in
  // vitkernels/ops/gelu_mlp.py): -> (y, h = gelu(x W1^T + b1) (M, H), pre = x W1^T + b1 (M, H) or empty), and
  // (grad_pre = (grad W2) * gelu'(pre), b1's gradient).
  m.def("gelu_mlp_own(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate, bool keep_pre) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("gelu_mlp_own_grad_pre(Tensor grad, Tensor w2, Tensor pre, str approximate) -> (Tensor, Tensor)");

  // Fused row ops between a transformer block's GEMMs (CPU; vitkernels/ops/<name>.py). The "_" variants work in
  // place, for inference.
  // y = gelu(x + bias) over the last dim; backward -> (grad_x, grad_bias).
  m.def("bias_gelu(Tensor x, Tensor bias, str approximate) -> Tensor");
  m.def("bias_gelu_(Tensor(a!) x, Tensor bias, str approximate) -> ()");
  m.def("bias_gelu_backward(Tensor grad, Tensor x, Tensor bias, str approximate) -> (Tensor, Tensor)");
  // out = residual + scale[sample] * (y + bias), y and residual (N, ..., C), scale (N) per sample (drop path).
  m.def("bias_residual(Tensor y, Tensor? bias, Tensor residual, Tensor? scale) -> Tensor");
  m.def("bias_residual_(Tensor(a!) y, Tensor? bias, Tensor residual, Tensor? scale) -> ()");
  // bias_residual recorded for autograd by a C++ autograd Function: the fused blocks' eager path
  // (csrc/cpu/bias_residual.cpp; torch.compile keeps the op above).
  m.def("bias_residual_eager(Tensor y, Tensor? bias, Tensor residual, Tensor? scale) -> Tensor");
  // x1 = residual + scale[sample] * (y + bias), out = LayerNorm(x1) -> (x1, out, mean, rstd); the in-place variant
  // leaves x1 in y and writes out. Backward -> (grad_residual, grad_y (empty without scale: it is grad_residual),
  // grad_bias, grad_weight, grad_ln_bias).
  m.def("bias_residual_layernorm(Tensor y, Tensor? bias, Tensor residual, Tensor? scale, Tensor? weight, "
        "Tensor? ln_bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bias_residual_layernorm_(Tensor(a!) y, Tensor? bias, Tensor residual, Tensor? scale, Tensor? weight, "
        "Tensor? ln_bias, float eps, Tensor(b!) out) -> ()");
  m.def("bias_residual_layernorm_backward(Tensor? grad_x1, Tensor grad_out, Tensor x1, Tensor mean, Tensor rstd, "
        "Tensor? weight, Tensor? scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (x1, out) of bias_residual_layernorm, float CPU, recorded for autograd by a C++ autograd Function: the fused
  // blocks' eager training path (csrc/cpu/bias_residual_layernorm.cpp; torch.compile keeps the op above).
  m.def("bias_residual_layernorm_eager(Tensor y, Tensor? bias, Tensor residual, Tensor? scale, Tensor? weight, "
        "Tensor? ln_bias, float eps) -> (Tensor, Tensor)");
  // Post-norm (Swin V2's res-post-norm blocks): out = residual + scale[sample] * LayerNorm(y + bias) -> (out, mean,
  // rstd); the in-place variant leaves out in y. Backward -> (grad_y, grad_bias, grad_weight, grad_ln_bias); the
  // residual's gradient is grad_out. x1 = y + bias is recomputed from y, not saved.
  m.def("bias_layernorm_residual(Tensor y, Tensor? bias, Tensor residual, Tensor? scale, Tensor? weight, "
        "Tensor? ln_bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("bias_layernorm_residual_(Tensor(a!) y, Tensor? bias, Tensor residual, Tensor? scale, Tensor? weight, "
        "Tensor? ln_bias, float eps) -> ()");
  m.def("bias_layernorm_residual_backward(Tensor grad_out, Tensor y, Tensor? bias, Tensor mean, Tensor rstd, "
        "Tensor? weight, Tensor? scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // Swin patch merging's 2x2 gather + LayerNorm(4C): x (B, H, W, C) -> (out (B, ceil(H/2), ceil(W/2), 4C), mean,
  // rstd); backward -> (grad_x, grad_weight, grad_bias).
  m.def("patch_merging_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // patch_merging_norm's merged, normalised map, recorded for autograd by a C++ autograd Function: the fused
  // PatchMerging's eager path (csrc/cpu/patch_merging.cpp; torch.compile keeps the op above).
  m.def("patch_merging_norm_eager(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("patch_merging_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight) -> "
        "(Tensor, Tensor, Tensor)");

  // Swin V2 scaled cosine window attention, qkv (B, H, W, 3C) in original token order, bias_table
  // ((2wh-1)(2ww-1), nH) (16 sigmoid of the cpb MLP), scale (nH) (exp of the clamped logit scale) -> (out (B, H, W, C),
  // row log-sum-exp (B * nW, nH, N), or with save_probs (CPU only, as window_attention's) the softmax (B * nW, nH, N,
  // NP)). The Triton custom op triton_window_attention_v2 has the same first seven arguments.
  m.def("window_attention_v2(Tensor qkv, Tensor bias_table, Tensor scale, Tensor? qkv_bias, int[2] window_size, "
        "int[2] shift_size, int num_heads, bool save_probs=False) -> (Tensor, Tensor)");
  // Gradients of qkv, bias_table, scale and qkv_bias (an empty tensor when there is no qkv_bias); lse: the forward's
  // softmax state as it came.
  m.def("window_attention_v2_backward(Tensor grad_out, Tensor qkv, Tensor bias_table, Tensor scale, Tensor? qkv_bias, "
        "Tensor out, Tensor lse, int[2] window_size, int[2] shift_size, int num_heads) -> (Tensor, Tensor, Tensor, "
        "Tensor)");

  // ViT patch embedding: image (B, C, H, W) -> tokens (B, P + L, D) with bias, position embedding and prefix tokens.
  m.def("patch_embed(Tensor x, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? prefix_tokens, "
        "bool no_embed_class, bool dynamic_img_pad) -> Tensor");
  // Its image and weight gradients (empty tensors where not needed); the other gradients are batch sums.
  m.def("patch_embed_backward(Tensor grad, Tensor x, Tensor weight, int num_prefix, bool dynamic_img_pad, "
        "bool need_input, bool need_weight) -> (Tensor, Tensor)");

  // MAE / MSN masking (same schemas as the Triton custom ops triton_<name>).
  // out[n, k] = src[n, idx[n or shared, k]] (+ add), 0 where the index is out of range; inverse_idx, idx's inverse
  // where in range (checked on CPU), is what the backward gathers by.
  m.def("gather_rows(Tensor src, Tensor idx, Tensor inverse_idx, Tensor? add, ScalarType? out_dtype) -> Tensor");
  // (x_masked, mask, ids_restore, ids_keep) from the noise's stable sort.
  m.def("random_masking(Tensor x, Tensor noise, int len_keep, Tensor? pos_embed) -> (Tensor, Tensor, Tensor, Tensor)");
  // ids_restore must be a permutation of range(L) per row: checked on CPU; on CUDA ranks outside [0, L) are masked.
  m.def("mae_unshuffle(Tensor x, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed) -> Tensor");
  m.def("mae_unshuffle_backward(Tensor grad, Tensor ids_restore, int keep, ScalarType x_dtype, "
        "ScalarType token_dtype) -> (Tensor, Tensor)");
}

namespace vitkernels {
namespace {

// Autograd kernel of the in-place inference variants (bias_gelu_, ...), which have no gradient formula. Without one,
// a call on tensors that require grad would leave the mutated tensor's autograd history as it was: its gradient
// silently that of the tensor before the op. Refused instead, naming the argument and the differentiable op to use;
// outside autograd (no_grad, inference_mode, no argument requiring grad) it only redispatches.
void refuse_grad_for_inplace_variant(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  if (at::GradMode::is_enabled()) {
    const size_t first = stack->size() - arguments.size();
    for (size_t i = 0; i < arguments.size(); ++i) {
      const c10::IValue& value = (*stack)[first + i];
      if (value.isTensor() && value.toTensor().defined() && value.toTensor().requires_grad()) {
        const std::string& name = op.schema().name();
        TORCH_CHECK(false, name, ": argument '", arguments[i].name(), "' requires grad, but this in-place variant ",
                    "is for inference and has no gradient: call ", name.substr(0, name.size() - 1),
                    " (out of place, differentiable) or run under torch.no_grad()");
      }
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView kernel of the same ops: bumps the version counter of every argument the op writes (Tensor(a!)),
// so that a tensor saved for another op's backward and then overwritten here is reported by autograd, as for
// PyTorch's own in-place ops, instead of silently differentiating the overwritten values.
void bump_versions_of_written_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                        torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    const c10::IValue& value = (*stack)[first + i];
    if (alias != nullptr && alias->isWrite() && value.isTensor() && value.toTensor().defined()) {
      written.push_back(value.toTensor());
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

// The in-place inference variants (schemas above), which both kernels serve.
constexpr const char* kInplaceInferenceVariants[] = {"bias_gelu_", "bias_residual_", "bias_residual_layernorm_",
                                                     "bias_layernorm_residual_"};

}  // namespace
}  // namespace vitkernels

TORCH_LIBRARY_IMPL(vitkernels, Autograd, m) {
  for (const char* name : vitkernels::kInplaceInferenceVariants) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&vitkernels::refuse_grad_for_inplace_variant>());
  }
}

TORCH_LIBRARY_IMPL(vitkernels, ADInplaceOrView, m) {
  for (const char* name : vitkernels::kInplaceInferenceVariants) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&vitkernels::bump_versions_of_written_arguments>());
  }
}
