"""Op: Swin shifted-window attention, from the qkv Linear's output in original token order to the attention output
in original token order (see :mod:`vitkernels.reference.window_attention` for the exact semantics).

Backends:

* ``reference`` -- :func:`vitkernels.reference.window_attention.window_attention` (roll, pad, partition, materialised
  bias and mask, softmax, reverse: timm's arithmetic).
* ``triton`` -- ``torch.ops.vitkernels.triton_window_attention`` (+ ``_backward``), launching the kernels of
  :mod:`vitkernels.triton.window_attention`;
* ``native`` -- ``torch.ops.vitkernels.window_attention`` (+ ``_backward``) from ``csrc/cpu/window_attention.cpp``
  (OpenMP, AVX-512 / AVX2 / baseline chosen at run time; in training its forward saves the softmax, which the
  backward reads instead of recomputing it) and ``csrc/cuda/window_attention.cpp`` (a plain CUDA fallback: windows
  of up to 256 tokens, head_dim <= 128; its backward recomputes the softmax from the row log-sum-exp).

Both fused backends fold shift, padding and partition into their addressing, gather the bias from the table by
index math and compute the mask from token coordinates; they share one fake implementation and one autograd
formula (below).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import (
    IntPair,
    check_int,
    check_same_device,
    check_shape,
    check_tensor,
    check_window_sizes,
    to_pair,
)
from vitkernels.ops._library import (keep_softmax_state_out_of_autograd, needs_grad, refuse_double_backward,
                                     takes_eager_autograd)
from vitkernels.reference import window_attention as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

op = dispatch.op("window_attention", "Swin (shifted) window attention with relative position bias, qkv -> out (NHWC)")


def window_attention(
    qkv: torch.Tensor,
    relative_position_bias_table: torch.Tensor,
    window_size: IntPair,
    shift_size: IntPair,
    num_heads: int,
    scale: Optional[float] = None,
    qkv_bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Shifted-window multi-head attention with relative position bias, in original NHWC token order.

    Args:
        qkv: (B, H, W, 3 * num_heads * head_dim), output of the qkv Linear on the unshifted image;
            channel ``s * nH * hd + h * hd + d`` holds q (s=0), k (s=1), v (s=2) of head h.
        relative_position_bias_table: ((2*wh - 1) * (2*ww - 1), num_heads); any float dtype (fp32 under AMP).
        window_size: ``ws`` or ``(wh, ww)``.
        shift_size: ``s`` or ``(sh, sw)``, ``0 <= shift < window``; non-zero applies the cyclic shift and the
            shifted-window mask (-100 across regions).
        num_heads: nH.
        scale: multiplies q before q @ k^T; default ``head_dim ** -0.5``.
        qkv_bias: (3 * nH * hd,) values of padded tokens when H or W is not a multiple of the window (the qkv
            Linear's bias, as in timm where zero-padded inputs go through the Linear); None means zeros.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (B, H, W, num_heads * head_dim), dtype of ``qkv``:
        ``out = window_reverse(softmax(scale * q k^T + bias + mask) v)`` per window and head.
    """
    window, shift, scale, call = _checked_call(
        qkv, relative_position_bias_table, window_size, shift_size, num_heads, scale, qkv_bias
    )
    impl = op.select(call, backend)
    return impl(qkv, relative_position_bias_table, list(window), list(shift), num_heads, float(scale), qkv_bias)


def _checked_call(qkv, relative_position_bias_table, window_size, shift_size, num_heads, scale, qkv_bias):
    """The checks of :func:`window_attention` (and :func:`window_attention_add_bias`): (window, shift, scale, call)."""
    check_tensor("qkv", qkv, ndim=4)
    check_tensor("relative_position_bias_table", relative_position_bias_table, ndim=2)
    window = to_pair("window_size", window_size)
    shift = to_pair("shift_size", shift_size, minimum=0)
    if shift[0] >= window[0] or shift[1] >= window[1]:
        raise ValueError(f"shift_size must be smaller than window_size, got shift {shift} for window {window}")
    check_int("num_heads", num_heads, minimum=1)
    B, H, W, three_c = qkv.shape
    if H == 0 or W == 0:
        raise ValueError(f"qkv must have a non-empty (H, W), got shape {tuple(qkv.shape)}")
    if three_c == 0 or three_c % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv.shape[-1] must be 3 * num_heads * head_dim with head_dim >= 1, got {three_c} with "
            f"num_heads={num_heads}"
        )
    check_window_sizes(H, W, window, B, three_c)
    check_shape(
        "relative_position_bias_table",
        relative_position_bias_table,
        ((2 * window[0] - 1) * (2 * window[1] - 1), num_heads),
        "((2*wh-1)*(2*ww-1), num_heads)",
    )
    scale, call = checked_bias_scale_call(qkv, relative_position_bias_table, qkv_bias, scale, window, shift,
                                          num_heads, window[0] * window[1])
    return window, shift, scale, call


def checked_bias_scale_call(qkv, table, qkv_bias, scale, window, shift, num_heads, tokens_per_window):
    """The checks every window attention op (2D, 3D) ends with, after qkv, the table and the geometry: qkv_bias is
    (qkv.shape[-1],) on qkv's device, scale a float (None: head_dim ** -0.5). Returns (scale, dispatch call)."""
    three_c = qkv.shape[-1]
    head_dim = three_c // (3 * num_heads)
    if qkv_bias is not None:
        check_tensor("qkv_bias", qkv_bias, ndim=1)
        check_shape("qkv_bias", qkv_bias, (three_c,), "qkv.shape[-1]")
    check_same_device(qkv=qkv, relative_position_bias_table=table, qkv_bias=qkv_bias)
    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    call = dispatch.Call(
        qkv.device,
        qkv.dtype,
        {"window_size": window, "shift_size": shift, "head_dim": head_dim, "num_heads": num_heads,
         "tokens_per_window": tokens_per_window},
    )
    return scale, call


@op.register("reference")
def _window_attention_reference(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias):
    return reference.window_attention(qkv, table, tuple(window_size), tuple(shift_size), num_heads, scale, qkv_bias)


# --- fake implementations and autograd, shared by the native and triton ops ----------------------------------------
# Both op sets have the schemas
#   forward(qkv, table, qkv_bias?, window_size, shift_size, num_heads, scale[, need_lse | save_probs]) -> (out, lse)
#     (the triton forward takes need_lse: False skips the log-sum-exp, an empty tensor then, when no backward follows;
#     the native one save_probs: True, on CPU, returns the softmax (B * nW, nH, N, NP) in the lse's place)
#   backward(grad_out, qkv, table, qkv_bias?, out, lse, window_size, shift_size, num_heads, scale)
#       -> (grad_qkv, grad_table, grad_qkv_bias or an empty tensor)
# lse is the (B * nW, nH, N) row log-sum-exp the backward recomputes the softmax from: fp32 (fp64 for fp64 inputs);
# or the saved softmax, which the backward reads as it is.

def _lse_dtype(qkv: torch.Tensor) -> torch.dtype:
    return torch.float64 if qkv.dtype == torch.float64 else torch.float32


def _forward_fake(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, need_lse=True):
    B, H, W, three_c = qkv.shape
    n_windows = B * -(-H // window_size[0]) * -(-W // window_size[1])
    out = qkv.new_empty((B, H, W, three_c // 3))
    lse_shape = (n_windows, num_heads, window_size[0] * window_size[1]) if need_lse else (0,)
    return out, qkv.new_empty(lse_shape, dtype=_lse_dtype(qkv))


def _saved_softmax_forward_fake(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, save_probs=False):
    """The native ops (window_attention, window_attention_add_bias): the second output is the lse, or with
    ``save_probs`` (CPU) the softmax itself, its rows zero-padded to a multiple of 16 columns (B * nW, nH, N, NP)
    (csrc/cpu/window_attention.cpp)."""
    out, lse = _forward_fake(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale)
    if save_probs:
        n = lse.shape[-1]
        lse = lse.new_empty((*lse.shape, -(-n // 16) * 16))
    return out, lse


def _backward_fake(grad_out, qkv, table, qkv_bias, out, lse, window_size, shift_size, num_heads, scale):
    bias_grad = qkv_bias.new_empty(qkv_bias.shape) if qkv_bias is not None else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), table.new_empty(table.shape), bias_grad


def _register_fakes_and_autograd(forward, backward, backend: str, name: str = "window_attention",
                                 forward_fake=_forward_fake, optional_lse: bool = True) -> None:
    """Fakes of ``forward`` / ``backward`` and the autograd formula. ``optional_lse``: the forward's 8th argument,
    when given, says whether it stores the lse (Triton's ``need_lse``); otherwise the forward always returns its
    softmax state (window_attention_add_bias: the lse or, with ``save_probs``, the softmax) and the backward takes
    it back as it came."""
    def setup_context(ctx, inputs, output):
        qkv, table, qkv_bias, ctx.window_size, ctx.shift_size, ctx.num_heads, ctx.scale = inputs[:7]
        ctx.has_lse = not optional_lse or len(inputs) < 8 or inputs[7]
        ctx.num_inputs = len(inputs)
        out, lse = output
        ctx.has_bias = qkv_bias is not None
        ctx.save_for_backward(qkv, table, qkv_bias, out, lse)
        keep_softmax_state_out_of_autograd(ctx, lse)

    def backward_fn(ctx, grad_out, grad_lse):
        if grad_out is None:  # the output was not used: no gradient flows
            return (None,) * ctx.num_inputs
        if not ctx.has_lse:
            raise RuntimeError(f"{name}: the forward ran with need_lse=False (no gradient was required), so it "
                               "cannot be differentiated")
        qkv, table, qkv_bias, out, lse = ctx.saved_tensors
        grad_qkv, grad_table, grad_bias = backward(
            grad_out.contiguous(), qkv, table, qkv_bias, out, lse, ctx.window_size, ctx.shift_size, ctx.num_heads,
            ctx.scale,
        )
        return (grad_qkv, grad_table, (grad_bias if ctx.has_bias else None)) + (None,) * (ctx.num_inputs - 3)

    torch.library.register_fake(forward)(forward_fake)
    torch.library.register_fake(backward)(_backward_fake)
    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)
    # second-order gradients would need the backward of the backward kernels: refused clearly, never silent zeros
    refuse_double_backward(backward, name, backend)


# --- native backend: csrc/cpu/window_attention.cpp -----------------------------------------------------------------

if _native.is_loaded():
    _register_fakes_and_autograd(torch.ops.vitkernels.window_attention.default,
                                 torch.ops.vitkernels.window_attention_backward.default, "native",
                                 forward_fake=_saved_softmax_forward_fake, optional_lse=False)

    def _native_supports(call: dispatch.Call) -> Optional[str]:
        reason = _native.native_unavailable_reason("window_attention", call.device)
        if reason is None and call.device.type == "cuda" and "head_dim" in call.details:
            # csrc/cuda/window_attention.cuh: a query row's head dim lives in registers of up to 4 threads
            if call.details["tokens_per_window"] > 256:
                reason = f"the CUDA kernel takes windows of at most 256 tokens, got {call.details['tokens_per_window']}"
            elif call.details["head_dim"] > 128:
                reason = f"the CUDA kernel takes head_dim <= 128, got {call.details['head_dim']}"
        return reason

    @op.register("native", _native_supports)
    def _window_attention_native(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias):
        # training on CPU: the forward saves the softmax and the backward reads it instead of recomputing it (fwd+bwd
        # 1.06-1.08x at Swin-T's stages 1 and 3 on a Zen 2); the CUDA kernels recompute it from the lse
        save_probs = qkv.device.type == "cpu" and needs_grad(qkv, table, qkv_bias)
        out, _ = torch.ops.vitkernels.window_attention(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale,
                                                       save_probs)
        return out

else:
    op.mark_missing("native", _native.IMPORT_ERROR)


# --- triton backend: vitkernels/triton/window_attention.py -------------------------------------------------------

if HAS_TRITON:
    from vitkernels.ops._library import kernel_op
    from vitkernels.triton import window_attention as triton_kernels
    from vitkernels.triton._launch import device_target

    @kernel_op("vitkernels::triton_window_attention")
    def triton_window_attention(
        qkv: torch.Tensor,
        table: torch.Tensor,
        qkv_bias: Optional[torch.Tensor],
        window_size: List[int],
        shift_size: List[int],
        num_heads: int,
        scale: float,
        need_lse: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward: (out (B, H, W, C), row log-sum-exp (B*nW, nH, N) fp32 kept for the backward; an empty tensor
        when ``need_lse`` is False, e.g. in inference, where the kernel then stores none)."""
        return triton_kernels.window_attention_fwd(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale,
                                                   need_lse)

    @kernel_op("vitkernels::triton_window_attention_backward")
    def triton_window_attention_backward(
        grad_out: torch.Tensor,
        qkv: torch.Tensor,
        table: torch.Tensor,
        qkv_bias: Optional[torch.Tensor],
        out: torch.Tensor,
        lse: torch.Tensor,
        window_size: List[int],
        shift_size: List[int],
        num_heads: int,
        scale: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of qkv, table and qkv_bias (an empty tensor when there is no qkv_bias)."""
        grad_qkv, grad_table, grad_bias = triton_kernels.window_attention_bwd(
            grad_out, qkv, table, qkv_bias, out, lse, window_size, shift_size, num_heads, scale
        )
        return grad_qkv, grad_table, grad_bias if grad_bias is not None else qkv.new_empty(0)

    _register_fakes_and_autograd(triton_window_attention, triton_window_attention_backward, "triton")

    def _triton_supports(call: dispatch.Call) -> Optional[str]:
        reason = triton_unavailable_reason(call.device)
        if reason is None and "head_dim" in call.details:  # reports (vitkernels.info) ask without shapes
            reason = triton_kernels.supported_reason(
                call.details["head_dim"], call.details["tokens_per_window"], call.dtype, device_target(call.device)
            )
        return reason

    @op.register("triton", _triton_supports)
    def _window_attention_triton(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias):
        need_lse = needs_grad(qkv, table, qkv_bias)
        out, _ = triton_window_attention(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, need_lse)
        return out

else:
    op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))


# --- window_attention_add_bias: the qkv Linear's bias added by the op (native CPU) ------------------------------------

add_bias_op = dispatch.op(
    "window_attention_add_bias",
    "window attention on the qkv Linear's output without its bias, which the op adds to every token",
)


def window_attention_add_bias(
    qkv: torch.Tensor,
    relative_position_bias_table: torch.Tensor,
    window_size: IntPair,
    shift_size: IntPair,
    num_heads: int,
    scale: Optional[float],
    qkv_bias: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """:func:`window_attention` of ``qkv + qkv_bias`` (padded tokens: ``qkv_bias``), with ``qkv`` the qkv Linear's
    product *without* its bias: the Linear can run as a plain GEMM, with no broadcast copy of the bias into its
    output (what ``addmm`` does); the bias's gradient is summed inside the op's backward."""
    if qkv_bias is None:
        raise ValueError("qkv_bias is required (without a bias, call window_attention)")
    window, shift, scale, call = _checked_call(
        qkv, relative_position_bias_table, window_size, shift_size, num_heads, scale, qkv_bias
    )
    impl = add_bias_op.select(call, backend)
    return impl(qkv, relative_position_bias_table, list(window), list(shift), num_heads, float(scale), qkv_bias)


@add_bias_op.register("reference")
def _window_attention_add_bias_reference(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias):
    return reference.window_attention(
        qkv + qkv_bias, table, tuple(window_size), tuple(shift_size), num_heads, scale, qkv_bias
    )


if _native.is_loaded():
    _register_fakes_and_autograd(torch.ops.vitkernels.window_attention_add_bias.default,
                                 torch.ops.vitkernels.window_attention_add_bias_backward.default, "native",
                                 "window_attention_add_bias", _saved_softmax_forward_fake, optional_lse=False)

    def _add_bias_native_supports(call: dispatch.Call) -> Optional[str]:
        if call.device.type != "cpu":
            return "window_attention_add_bias has a CPU kernel only"
        return _native.native_unavailable_reason("window_attention_add_bias", call.device)

    # None: a vitkernels._C built before the op existed
    _add_bias_eager = getattr(torch.ops.vitkernels, "window_attention_add_bias_eager", None)

    def fused_window_attention_add_bias(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale):
        """The attention output of the native op, argument order as the op's; in training the forward saves the
        softmax and the backward reads it instead of recomputing it (timm's attention keeps its softmax for its
        backward too). Through ``vitkernels::window_attention_add_bias_eager`` where :func:`takes_eager_autograd`
        says, else ``vitkernels::window_attention_add_bias``: the fused Swin block's and the native backend's call."""
        if takes_eager_autograd(_add_bias_eager, qkv):
            return _add_bias_eager(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale)
        out, _ = torch.ops.vitkernels.window_attention_add_bias(
            qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, needs_grad(qkv, table, qkv_bias)
        )
        return out

    @add_bias_op.register("native", _add_bias_native_supports)
    def _window_attention_add_bias_native(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias):
        return fused_window_attention_add_bias(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale)

else:
    add_bias_op.mark_missing("native", _native.IMPORT_ERROR)
