"""Op: 3D (volumetric / video) shifted-window attention, from the qkv Linear's output in original (B, D, H, W) token
order to the attention output in original order (MONAI SwinUNETR, Video Swin; see
:mod:`vitkernels.reference.window_attention_3d` for the exact semantics).

Backends:

* ``reference`` -- :func:`vitkernels.reference.window_attention_3d.window_attention_3d` (pad, roll, partition,
  materialised bias and 27-region mask, softmax, reverse: MONAI's arithmetic).
* ``native`` -- ``torch.ops.vitkernels.window_attention_3d`` (+ ``_backward``) from ``csrc/cpu/window_attention_3d.cpp``:
  the 2D op's CPU kernel (OpenMP, AVX-512 / AVX2 / baseline chosen at run time) over a 3D window addressing; and on
  CUDA from ``csrc/cuda/window_attention_3d.cpp``: the 2D op's CUDA kernels over the 3D geometry (windows of at most
  512 tokens, head_dim <= 128; built when the extension is built with CUDA).
* ``triton`` -- ``torch.ops.vitkernels.triton_window_attention_3d`` (+ ``_backward``), launching the 2D op's kernels
  with their depth axis (:mod:`vitkernels.triton.window_attention_3d`): the GPU path (windows of up to 512 tokens,
  MONAI's 7x7x7 and Video Swin's 8x7x7 included; head_dim a power of two in [16, 128], else the reference serves
  the call and the dispatcher says why).

Both fused backends fold padding and shift (in either order) and the partition into their addressing, gather the
bias from the table by index math and compute the mask from padded token coordinates; forward saves the row
log-sum-exp, the backward recomputes the softmax from it. They share one fake implementation and one autograd
formula (below). Second-order gradients are refused (reference backend).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import INT64_MAX, check_int, check_shape, check_tensor
from vitkernels.ops._library import keep_softmax_state_out_of_autograd, refuse_double_backward
from vitkernels.ops._library import needs_grad
from vitkernels.ops.window_attention import checked_bias_scale_call
from vitkernels.reference import window_attention_3d as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

IntTriple = Union[int, Sequence[int]]

op = dispatch.op(
    "window_attention_3d",
    "3D (volumetric) shifted-window attention with relative position bias, qkv -> out (B, D, H, W, C)",
)


def window_attention_3d(
    qkv: torch.Tensor,
    relative_position_bias_table: torch.Tensor,
    window_size: IntTriple,
    shift_size: IntTriple,
    num_heads: int,
    scale: Optional[float] = None,
    qkv_bias: Optional[torch.Tensor] = None,
    pad_before_shift: bool = True,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """3D shifted-window multi-head attention with relative position bias, in original (B, D, H, W) token order.

    Args:
        qkv: (B, D, H, W, 3 * num_heads * head_dim), output of the qkv Linear on the unshifted volume; channel
            ``s * nH * hd + h * hd + d`` holds q (s=0), k (s=1), v (s=2) of head h.
        relative_position_bias_table: ((2wd-1)(2wh-1)(2ww-1), num_heads); any float dtype.
        window_size: ``w`` or ``(wd, wh, ww)``. shift_size: ``s`` or ``(sd, sh, sw)`` with ``0 <= shift < window``
            per axis; a non-zero shift applies the cyclic shift and the 27-region mask (-100 across regions).
            MONAI's per-input window shrinking is the caller's (:func:`vitkernels.reference.window_attention_3d.
            effective_window_and_shift`).
        num_heads: nH.
        scale: multiplies q before q @ k^T; default ``head_dim ** -0.5``.
        qkv_bias: (3 * nH * hd,) q, k, v of padded tokens when D, H or W is not a multiple of the window (the qkv
            Linear's bias: the models zero-pad before the Linear); None means zeros.
        pad_before_shift: True (MONAI, Video Swin): pad, then roll; False (timm's 2D order): roll, then pad.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (B, D, H, W, num_heads * head_dim), dtype of ``qkv``: ``softmax(scale q k^T + bias + mask) v`` per window
        and head, windows reversed into the original order.
    """
    window, shift, scale, call = _checked_call(
        qkv, relative_position_bias_table, window_size, shift_size, num_heads, scale, qkv_bias, pad_before_shift
    )
    impl = op.select(call, backend)
    return impl(qkv, relative_position_bias_table, list(window), list(shift), num_heads, float(scale), qkv_bias,
                bool(pad_before_shift))


def _to_triple(name: str, value: IntTriple, minimum: int) -> Tuple[int, int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a triple of ints, got {value!r}")
    if isinstance(value, int):
        triple = (value,) * 3
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 3:
        triple = tuple(value)
    else:
        raise TypeError(f"{name} must be an int or a triple of ints (d, h, w), got {value!r}")
    for v in triple:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must contain ints, got {value!r}")
        if v < minimum:
            raise ValueError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value!r}")
    return tuple(int(v) for v in triple)


def _checked_call(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias, pad_before_shift):
    check_tensor("qkv", qkv, ndim=5)
    check_tensor("relative_position_bias_table", table, ndim=2)
    window = _to_triple("window_size", window_size, 1)
    shift = _to_triple("shift_size", shift_size, 0)
    if any(s >= w for s, w in zip(shift, window)):
        raise ValueError(f"shift_size must be smaller than window_size per axis, got shift {shift} for window {window}")
    check_int("num_heads", num_heads, minimum=1)
    if not isinstance(pad_before_shift, bool):
        raise TypeError(f"pad_before_shift must be a bool, got {pad_before_shift!r}")
    B, D, H, W, three_c = qkv.shape
    if D == 0 or H == 0 or W == 0:
        raise ValueError(f"qkv must have a non-empty (D, H, W), got shape {tuple(qkv.shape)}")
    if three_c == 0 or three_c % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv.shape[-1] must be 3 * num_heads * head_dim with head_dim >= 1, got {three_c} with "
            f"num_heads={num_heads}"
        )
    padded = reference.padded_size_3d((D, H, W), window)
    N = window[0] * window[1] * window[2]
    for what, value in (
        ("tokens per window (wd * wh * ww)", N),
        ("bias rows (num_heads * N * N)", num_heads * N * N),
        ("partitioned elements (B * Dp * Hp * Wp * channels)", B * padded[0] * padded[1] * padded[2] * three_c),
    ):
        if value > INT64_MAX:
            raise ValueError(f"window_size {window} is too large for a {D}x{H}x{W} volume: its {what} would be "
                             f"{value}, more than int64 can index")
    rows = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
    check_shape("relative_position_bias_table", table, (rows, num_heads), "((2wd-1)*(2wh-1)*(2ww-1), num_heads)")
    scale, call = checked_bias_scale_call(qkv, table, qkv_bias, scale, window, shift, num_heads, N)
    return window, shift, scale, call


@op.register("reference")
def _window_attention_3d_reference(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias,
                                   pad_before_shift):
    return reference.window_attention_3d(qkv, table, tuple(window_size), tuple(shift_size), num_heads, scale,
                                         qkv_bias, pad_before_shift=pad_before_shift)


# --- fake implementations and autograd, shared by the native and triton ops -----------------------------------------
# forward(qkv, table, qkv_bias?, window_size, shift_size, num_heads, scale, pad_before_shift[, need_lse]) -> (out, lse)
#   (the triton forward takes need_lse: False skips the log-sum-exp, an empty tensor then, when no backward follows)
# backward(grad_out, qkv, table, qkv_bias?, out, lse, window_size, shift_size, num_heads, scale, pad_before_shift)
#     -> (grad_qkv, grad_table, grad_qkv_bias or an empty tensor)
# lse is the (B * nW, nH, N) row log-sum-exp: fp32 (fp64 for fp64 inputs).

def _forward_fake(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, pad_before_shift, need_lse=True):
    B, D, H, W, three_c = qkv.shape
    n_windows = B * -(-D // window_size[0]) * -(-H // window_size[1]) * -(-W // window_size[2])
    tokens = window_size[0] * window_size[1] * window_size[2]
    lse_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    lse_shape = (n_windows, num_heads, tokens) if need_lse else (0,)
    return qkv.new_empty((B, D, H, W, three_c // 3)), qkv.new_empty(lse_shape, dtype=lse_dtype)


def _backward_fake(grad_out, qkv, table, qkv_bias, out, lse, window_size, shift_size, num_heads, scale,
                   pad_before_shift):
    bias_grad = qkv_bias.new_empty(qkv_bias.shape) if qkv_bias is not None else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), table.new_empty(table.shape), bias_grad


def _register_fakes_and_autograd(forward, backward, backend: str) -> None:
    def setup_context(ctx, inputs, output):
        qkv, table, qkv_bias, *config = inputs
        ctx.config = config[:5]  # window_size, shift_size, num_heads, scale, pad_before_shift
        ctx.has_lse = len(config) < 6 or config[5]
        ctx.num_inputs = len(inputs)
        out, lse = output
        ctx.has_bias = qkv_bias is not None
        ctx.save_for_backward(qkv, table, qkv_bias, out, lse)
        keep_softmax_state_out_of_autograd(ctx, lse)

    def backward_fn(ctx, grad_out, grad_lse):
        if grad_out is None:  # the output was not used: no gradient flows
            return (None,) * ctx.num_inputs
        if not ctx.has_lse:
            raise RuntimeError("window_attention_3d: the forward ran with need_lse=False (no gradient was required), "
                               "so it cannot be differentiated")
        qkv, table, qkv_bias, out, lse = ctx.saved_tensors
        grad_qkv, grad_table, grad_bias = backward(grad_out.contiguous(), qkv, table, qkv_bias, out, lse, *ctx.config)
        return (grad_qkv, grad_table, grad_bias if ctx.has_bias else None) + (None,) * (ctx.num_inputs - 3)

    torch.library.register_fake(forward)(_forward_fake)
    torch.library.register_fake(backward)(_backward_fake)
    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)
    # second-order gradients would need the backward of the backward kernels: refused clearly, never silent zeros
    refuse_double_backward(backward, "window_attention_3d", backend)


# --- native backend: csrc/cpu/window_attention_3d.cpp, csrc/cuda/window_attention_3d.cpp ----------------------------

if _native.is_loaded() and hasattr(torch.ops.vitkernels, "window_attention_3d"):
    _register_fakes_and_autograd(torch.ops.vitkernels.window_attention_3d.default,
                                 torch.ops.vitkernels.window_attention_3d_backward.default, "native")

    def _native_supports(call: dispatch.Call) -> Optional[str]:
        reason = _native.native_unavailable_reason("window_attention_3d", call.device)
        if reason is None and call.device.type == "cuda" and "head_dim" in call.details:
            # csrc/cuda/window_attention_3d.cuh: per-window token arrays in shared memory, a query row's head dim in
            # registers of up to 4 threads
            if call.details["tokens_per_window"] > 512:
                reason = ("the CUDA kernel takes windows of at most 512 tokens (wd * wh * ww), got "
                          f"{call.details['tokens_per_window']}")
            elif call.details["head_dim"] > 128:
                reason = f"the CUDA kernel takes head_dim <= 128, got {call.details['head_dim']}"
        return reason

    @op.register("native", _native_supports)
    def _window_attention_3d_native(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias,
                                    pad_before_shift):
        out, _ = torch.ops.vitkernels.window_attention_3d(qkv, table, qkv_bias, window_size, shift_size, num_heads,
                                                          scale, pad_before_shift)
        return out

else:
    op.mark_missing("native", _native.IMPORT_ERROR or "vitkernels._C was built without window_attention_3d (rebuild it)")


# --- triton backend: vitkernels/triton/window_attention_3d.py -----------------------------------------------------

if HAS_TRITON:
    from vitkernels.ops._library import kernel_op
    from vitkernels.triton import window_attention_3d as triton_kernels
    from vitkernels.triton._launch import device_target

    @kernel_op("vitkernels::triton_window_attention_3d")
    def triton_window_attention_3d(
        qkv: torch.Tensor,
        table: torch.Tensor,
        qkv_bias: Optional[torch.Tensor],
        window_size: List[int],
        shift_size: List[int],
        num_heads: int,
        scale: float,
        pad_before_shift: bool,
        need_lse: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward: (out (B, D, H, W, C), row log-sum-exp (B*nW, nH, N) fp32 kept for the backward; an empty tensor
        when ``need_lse`` is False, e.g. in inference, where the kernel then stores none)."""
        return triton_kernels.window_attention_3d_fwd(qkv, table, qkv_bias, window_size, shift_size, num_heads,
                                                      scale, pad_before_shift, need_lse)

    @kernel_op("vitkernels::triton_window_attention_3d_backward")
    def triton_window_attention_3d_backward(
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
        pad_before_shift: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of qkv, table and qkv_bias (an empty tensor when there is no qkv_bias)."""
        grad_qkv, grad_table, grad_bias = triton_kernels.window_attention_3d_bwd(
            grad_out, qkv, table, qkv_bias, out, lse, window_size, shift_size, num_heads, scale, pad_before_shift
        )
        return grad_qkv, grad_table, grad_bias if grad_bias is not None else qkv.new_empty(0)

    _register_fakes_and_autograd(triton_window_attention_3d, triton_window_attention_3d_backward, "triton")

    def _triton_supports(call: dispatch.Call) -> Optional[str]:
        reason = triton_unavailable_reason(call.device)
        if reason is None and "head_dim" in call.details:  # reports (vitkernels.info) ask without shapes
            reason = triton_kernels.supported_reason(
                call.details["head_dim"], call.details["tokens_per_window"], call.dtype, device_target(call.device)
            )
        return reason

    @op.register("triton", _triton_supports)
    def _window_attention_3d_triton(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias,
                                    pad_before_shift):
        need_lse = needs_grad(qkv, table, qkv_bias)
        out, _ = triton_window_attention_3d(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale,
                                            pad_before_shift, need_lse)
        return out

else:
    op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))
