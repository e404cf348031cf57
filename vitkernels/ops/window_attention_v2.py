"""Op: Swin V2 shifted-window scaled cosine attention with a continuous position bias, from the qkv Linear's output
in original token order to the attention output in original token order (semantics:
:mod:`vitkernels.reference.window_attention_v2`).

The layout is V1's (:mod:`vitkernels.ops.window_attention`): qkv (B, H, W, 3C) unshifted and unpartitioned, shift,
padding and partition in the kernels' addressing, the bias gathered from a ((2wh-1)(2ww-1), nH) table by index math,
the mask from token coordinates. What V2 adds inside the kernels: q and k L2-normalised per head (``F.normalize``,
eps 1e-12), the cosine similarities multiplied by a per-head ``scale`` tensor. The table (``16 * sigmoid`` of the
cpb MLP) and ``scale`` (``exp(clamp(logit_scale))``) are inputs computed in PyTorch autograd around the op; the
backward returns their gradients with dq, dk, dv.

Backends:

* ``reference`` -- :func:`vitkernels.reference.window_attention_v2.window_attention_v2` (timm's arithmetic).
* ``native`` -- ``torch.ops.vitkernels.window_attention_v2`` (+ ``_backward``) from
  ``csrc/cpu/window_attention_v2.cpp`` (OpenMP; AVX-512 / AVX2 / baseline chosen at run time, as V1; in training its
  forward saves the softmax, which the backward reads instead of recomputing it) and
  ``csrc/cuda/window_attention_v2.cpp`` (V1's plain CUDA fallback design: windows of up to 256 tokens, head_dim <= 128;
  compile-checked, not yet run on a GPU).
* ``triton`` -- ``torch.ops.vitkernels.triton_window_attention_v2`` (+ ``_backward``), launching V1's window
  attention kernels with their cosine branch (:mod:`vitkernels.triton.window_attention_v2`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import IntPair, check_int, check_same_device, check_shape, check_tensor, to_pair
from vitkernels.ops._library import keep_softmax_state_out_of_autograd, needs_grad, refuse_double_backward
from vitkernels.ops.window_attention import _lse_dtype
from vitkernels.reference import window_attention_v2 as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

op = dispatch.op(
    "window_attention_v2",
    "Swin V2 scaled cosine window attention with continuous position bias, qkv -> out (NHWC)",
)


def window_attention_v2(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    scale: torch.Tensor,
    window_size: IntPair,
    shift_size: IntPair,
    num_heads: int,
    qkv_bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Swin V2 shifted-window cosine attention with continuous position bias, in original NHWC token order.

    Args:
        qkv: (B, H, W, 3 * num_heads * head_dim), output of the qkv Linear on the unshifted image;
            channel ``s * nH * hd + h * hd + d`` holds q (s=0), k (s=1), v (s=2) of head h.
        bias_table: ((2*wh - 1) * (2*ww - 1), num_heads), the bias added to the logits by relative position
            (timm: ``16 * sigmoid(cpb_mlp(relative_coords_table))``); any float dtype.
        scale: (num_heads,) multiplier of each head's cosine similarities (timm:
            ``exp(clamp(logit_scale, max=log(100)))``); any float dtype.
        window_size: ``ws`` or ``(wh, ww)``.
        shift_size: ``s`` or ``(sh, sw)``, ``0 <= shift < window``; non-zero applies the cyclic shift and the
            shifted-window mask (-100 across regions).
        num_heads: nH.
        qkv_bias: (3 * nH * hd,) values of padded tokens when H or W is not a multiple of the window (timm:
            ``cat(q_bias, k_bias, v_bias)``, what its qkv Linear gives the zero-padded input); None means zeros.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (B, H, W, num_heads * head_dim), dtype of ``qkv``: per window and head
        ``softmax(scale[h] * normalize(q) normalize(k)^T + bias + mask) v``, in original token order.
    """
    check_tensor("qkv", qkv, ndim=4)
    check_tensor("bias_table", bias_table, ndim=2)
    check_tensor("scale", scale, ndim=1)
    window = to_pair("window_size", window_size)
    shift = to_pair("shift_size", shift_size, minimum=0)
    if shift[0] >= window[0] or shift[1] >= window[1]:
        raise ValueError(f"shift_size must be smaller than window_size, got shift {shift} for window {window}")
    check_int("num_heads", num_heads, minimum=1)
    B, H, W, three_c = qkv.shape
    if H == 0 or W == 0:
        raise ValueError(f"qkv must have a non-empty (H, W), got shape {tuple(qkv.shape)}")
    if three_c % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv.shape[-1] must be 3 * num_heads * head_dim, got {three_c} with num_heads={num_heads}"
        )
    head_dim = three_c // (3 * num_heads)
    check_shape("bias_table", bias_table, ((2 * window[0] - 1) * (2 * window[1] - 1), num_heads),
                "((2*wh-1)*(2*ww-1), num_heads)")
    check_shape("scale", scale, (num_heads,), "(num_heads,)")
    if qkv_bias is not None:
        check_tensor("qkv_bias", qkv_bias, ndim=1)
        check_shape("qkv_bias", qkv_bias, (three_c,), "qkv.shape[-1]")
    check_same_device(qkv=qkv, bias_table=bias_table, scale=scale, qkv_bias=qkv_bias)
    call = dispatch.Call(
        qkv.device,
        qkv.dtype,
        {"window_size": window, "shift_size": shift, "head_dim": head_dim, "num_heads": num_heads,
         "tokens_per_window": window[0] * window[1]},
    )
    impl = op.select(call, backend)
    return impl(qkv, bias_table, scale, list(window), list(shift), num_heads, qkv_bias)


@op.register("reference")
def _window_attention_v2_reference(qkv, bias_table, scale, window_size, shift_size, num_heads, qkv_bias):
    return reference.window_attention_v2(qkv, bias_table, scale, tuple(window_size), tuple(shift_size), num_heads,
                                         qkv_bias)


# --- fake implementations and autograd, shared by the native and triton ops ----------------------------------------
# Both op sets have the schemas
#   forward(qkv, bias_table, scale, qkv_bias?, window_size, shift_size, num_heads[, save_probs]) -> (out, lse)
#   backward(grad_out, qkv, bias_table, scale, qkv_bias?, out, lse, window_size, shift_size, num_heads)
#       -> (grad_qkv, grad_bias_table, grad_scale, grad_qkv_bias or an empty tensor)
# lse is the (B * nW, nH, N) row log-sum-exp the backward recomputes the softmax from: fp32 (fp64 for fp64 inputs);
# with the native forward's save_probs (CPU), the softmax itself (B * nW, nH, N, NP), which the backward reads.

def _forward_fake(qkv, bias_table, scale, qkv_bias, window_size, shift_size, num_heads, save_probs=False):
    B, H, W, three_c = qkv.shape
    n_windows = B * -(-H // window_size[0]) * -(-W // window_size[1])
    out = qkv.new_empty((B, H, W, three_c // 3))
    n = window_size[0] * window_size[1]
    state_shape = (n_windows, num_heads, n) + ((-(-n // 16) * 16,) if save_probs else ())  # rows padded to NP
    return out, qkv.new_empty(state_shape, dtype=_lse_dtype(qkv))


def _backward_fake(grad_out, qkv, bias_table, scale, qkv_bias, out, lse, window_size, shift_size, num_heads):
    bias_grad = qkv_bias.new_empty(qkv_bias.shape) if qkv_bias is not None else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), bias_table.new_empty(bias_table.shape), scale.new_empty(scale.shape), bias_grad


def _register_fakes_and_autograd(forward, backward, backend: str) -> None:
    def setup_context(ctx, inputs, output):
        qkv, bias_table, scale, qkv_bias, ctx.window_size, ctx.shift_size, ctx.num_heads = inputs[:7]
        ctx.num_inputs = len(inputs)
        out, lse = output
        ctx.has_bias = qkv_bias is not None
        ctx.save_for_backward(qkv, bias_table, scale, qkv_bias, out, lse)
        keep_softmax_state_out_of_autograd(ctx, lse)

    def backward_fn(ctx, grad_out, grad_lse):
        if grad_out is None:  # the output was not used: no gradient flows
            return (None,) * ctx.num_inputs
        qkv, bias_table, scale, qkv_bias, out, lse = ctx.saved_tensors
        grad_qkv, grad_table, grad_scale, grad_bias = backward(
            grad_out.contiguous(), qkv, bias_table, scale, qkv_bias, out, lse, ctx.window_size, ctx.shift_size,
            ctx.num_heads,
        )
        grad_bias = grad_bias if ctx.has_bias else None
        return (grad_qkv, grad_table, grad_scale, grad_bias) + (None,) * (ctx.num_inputs - 4)

    torch.library.register_fake(forward)(_forward_fake)
    torch.library.register_fake(backward)(_backward_fake)
    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)
    # second-order gradients would need the backward of the backward kernels: refused clearly, never silent zeros
    refuse_double_backward(backward, "window_attention_v2", backend)


# --- native backend: csrc/cpu/window_attention_v2.cpp --------------------------------------------------------------

if "window_attention_v2" in _native.KERNELS:
    _register_fakes_and_autograd(torch.ops.vitkernels.window_attention_v2.default,
                                 torch.ops.vitkernels.window_attention_v2_backward.default, "native")

    def _native_supports(call: dispatch.Call) -> Optional[str]:
        reason = _native.native_unavailable_reason("window_attention_v2", call.device)
        if reason is None and call.device.type == "cuda" and "head_dim" in call.details:
            # csrc/cuda/window_attention_v2.cuh has V1's limits: a row's head dim in registers of up to 4 threads
            if call.details["tokens_per_window"] > 256:
                reason = f"the CUDA kernel takes windows of at most 256 tokens, got {call.details['tokens_per_window']}"
            elif call.details["head_dim"] > 128:
                reason = f"the CUDA kernel takes head_dim <= 128, got {call.details['head_dim']}"
        return reason

    @op.register("native", _native_supports)
    def _window_attention_v2_native(qkv, bias_table, scale, window_size, shift_size, num_heads, qkv_bias):
        # training on CPU: the forward saves the softmax and the backward reads it instead of recomputing it; the CUDA
        # kernels recompute it from the lse
        save_probs = qkv.device.type == "cpu" and needs_grad(qkv, bias_table, scale, qkv_bias)
        out, _ = torch.ops.vitkernels.window_attention_v2(qkv, bias_table, scale, qkv_bias, window_size, shift_size,
                                                          num_heads, save_probs)
        return out

elif not _native.is_loaded():
    op.mark_missing("native", _native.IMPORT_ERROR)
else:
    op.mark_missing("native", "vitkernels._C has no window_attention_v2 (built from older sources: rebuild it)")


# --- triton backend: vitkernels/triton/window_attention_v2.py ----------------------------------------------------

if HAS_TRITON:
    from vitkernels.ops._library import kernel_op
    from vitkernels.triton import window_attention_v2 as triton_kernels
    from vitkernels.triton._launch import device_target

    @kernel_op("vitkernels::triton_window_attention_v2")
    def triton_window_attention_v2(
        qkv: torch.Tensor,
        bias_table: torch.Tensor,
        scale: torch.Tensor,
        qkv_bias: Optional[torch.Tensor],
        window_size: List[int],
        shift_size: List[int],
        num_heads: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward: (out (B, H, W, C), row log-sum-exp (B*nW, nH, N) fp32, kept for the backward)."""
        return triton_kernels.window_attention_v2_fwd(qkv, bias_table, scale, qkv_bias, window_size, shift_size,
                                                      num_heads)

    @kernel_op("vitkernels::triton_window_attention_v2_backward")
    def triton_window_attention_v2_backward(
        grad_out: torch.Tensor,
        qkv: torch.Tensor,
        bias_table: torch.Tensor,
        scale: torch.Tensor,
        qkv_bias: Optional[torch.Tensor],
        out: torch.Tensor,
        lse: torch.Tensor,
        window_size: List[int],
        shift_size: List[int],
        num_heads: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of qkv, bias_table, scale and qkv_bias (an empty tensor when there is no qkv_bias)."""
        grad_qkv, grad_table, grad_scale, grad_bias = triton_kernels.window_attention_v2_bwd(
            grad_out, qkv, bias_table, scale, qkv_bias, out, lse, window_size, shift_size, num_heads
        )
        return grad_qkv, grad_table, grad_scale, grad_bias if grad_bias is not None else qkv.new_empty(0)

    _register_fakes_and_autograd(triton_window_attention_v2, triton_window_attention_v2_backward, "triton")

    def _triton_supports(call: dispatch.Call) -> Optional[str]:
        reason = triton_unavailable_reason(call.device)
        if reason is None and "head_dim" in call.details:  # reports (vitkernels.info) ask without shapes
            reason = triton_kernels.supported_reason(
                call.details["head_dim"], call.details["tokens_per_window"], call.dtype, device_target(call.device)
            )
        return reason

    @op.register("triton", _triton_supports)
    def _window_attention_v2_triton(qkv, bias_table, scale, window_size, shift_size, num_heads, qkv_bias):
        out, _ = triton_window_attention_v2(qkv, bias_table, scale, qkv_bias, window_size, shift_size, num_heads)
        return out

else:
    op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))
