"""Op: Swin shifted-window attention, from the qkv Linear's output in original token order to the attention output
in original token order (see :mod:`vitkernels.reference.window_attention` for the exact semantics).

Backends:

* ``reference`` -- :func:`vitkernels.reference.window_attention.window_attention` (roll, pad, partition, materialised
  bias and mask, softmax, reverse: timm's arithmetic).
* ``triton`` / ``native`` -- fused kernels that fold shift, padding and partition into their addressing, gather the
  bias from the table and compute the mask from token coordinates (registered by the files of the same name in
  ``vitkernels/triton`` and ``csrc/``).
"""
from __future__ import annotations

from typing import Optional

import torch

from vitkernels import dispatch
from vitkernels._validation import (
    IntPair,
    check_int,
    check_same_device,
    check_shape,
    check_tensor,
    to_pair,
)
from vitkernels.reference import window_attention as reference

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
    if three_c % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv.shape[-1] must be 3 * num_heads * head_dim, got {three_c} with num_heads={num_heads}"
        )
    head_dim = three_c // (3 * num_heads)
    check_shape(
        "relative_position_bias_table",
        relative_position_bias_table,
        ((2 * window[0] - 1) * (2 * window[1] - 1), num_heads),
        "((2*wh-1)*(2*ww-1), num_heads)",
    )
    if qkv_bias is not None:
        check_tensor("qkv_bias", qkv_bias, ndim=1)
        check_shape("qkv_bias", qkv_bias, (three_c,), "qkv.shape[-1]")
    check_same_device(qkv=qkv, relative_position_bias_table=relative_position_bias_table, qkv_bias=qkv_bias)
    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    call = dispatch.Call(
        qkv.device,
        qkv.dtype,
        {"window_size": window, "shift_size": shift, "head_dim": head_dim, "num_heads": num_heads,
         "tokens_per_window": window[0] * window[1]},
    )
    impl = op.select(call, backend)
    return impl(qkv, relative_position_bias_table, list(window), list(shift), num_heads, float(scale), qkv_bias)


@op.register("reference")
def _window_attention_reference(qkv, table, window_size, shift_size, num_heads, scale, qkv_bias):
    return reference.window_attention(qkv, table, tuple(window_size), tuple(shift_size), num_heads, scale, qkv_bias)


op.mark_missing("triton", "the fused Triton window attention kernel is not built yet")
op.mark_missing("native", "no C++ window attention kernel yet")
