"""Op: Swin's cyclic shift + window partition, and its inverse, fused into one pass each.

Public functions :func:`window_partition` and :func:`window_reverse` validate their arguments and dispatch to

* ``reference`` -- :mod:`vitkernels.reference.window_partition` (roll + pad + view/permute copies),
* ``native``    -- ``torch.ops.vitkernels.window_partition`` / ``window_reverse`` from ``csrc/cpu/window_partition.cpp``
  and ``csrc/cuda/window_partition.cpp``,
* ``triton``    -- ``torch.ops.vitkernels.triton_window_partition`` / ``triton_window_reverse`` launching the kernels
  of :mod:`vitkernels.triton.window_partition`.

The fast ops are registered with torch.library (fake implementations for torch.compile, autograd: each op's backward
is the other op, since partition and reverse are adjoint).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import IntPair, check_tensor, check_window_sizes, to_pair
from vitkernels.reference import window_partition as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

partition_op = dispatch.op("window_partition", "cyclic shift + zero pad + window partition (B,H,W,C)->(B*nW,N,C)")
reverse_op = dispatch.op("window_reverse", "window merge + crop + roll back (B*nW,N,C)->(B,H,W,C)")


# --- public API ---------------------------------------------------------------------------------------------------

def window_partition(
    x: torch.Tensor, window_size: IntPair, shift_size: IntPair = 0, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Roll ``x`` by ``-shift_size``, zero-pad it to whole windows and split it into windows, in one pass.

    Args:
        x: (B, H, W, C) tokens in NHWC order.
        window_size: ``wh`` or ``(wh, ww)``, positive.
        shift_size: ``s`` or ``(sh, sw)`` with ``0 <= shift < window``.
        backend: ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``; see :mod:`vitkernels.dispatch`.

    Returns:
        (B * ceil(H/wh) * ceil(W/ww), wh * ww, C) windows, window-major then row-major inside each window;
        ``windows[w, t] = x[b, (r + sh) % H, (s + sw) % W]`` for the padded coordinate (r, s) of row t of window w,
        or 0 where (r, s) is padding.
    """
    check_tensor("x", x, ndim=4)
    window, shift = _check_window_args(window_size, shift_size)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must have a non-empty (H, W), got shape {tuple(x.shape)}")
    B, H, W, C = x.shape
    check_window_sizes(H, W, window, B, C)
    impl = partition_op.select(dispatch.Call(x.device, x.dtype), backend)
    return impl(x, window, shift)


def window_reverse(
    windows: torch.Tensor,
    height: int,
    width: int,
    window_size: IntPair,
    shift_size: IntPair = 0,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: merge windows, crop the padding and roll by ``+shift_size``.

    Args:
        windows: (B * ceil(H/wh) * ceil(W/ww), wh * ww, C).
        height, width: H and W of the image the windows came from.
        window_size, shift_size, backend: as for :func:`window_partition`.

    Returns:
        (B, H, W, C).
    """
    check_tensor("windows", windows, ndim=3)
    window, shift = _check_window_args(window_size, shift_size)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_window_sizes(height, width, window)
    n_windows = _num_windows(height, width, window)
    if windows.shape[1] != window[0] * window[1]:
        raise ValueError(f"windows.shape[1] must be wh * ww = {window[0] * window[1]}, got shape {tuple(windows.shape)}")
    if windows.shape[0] % n_windows != 0:
        raise ValueError(
            f"windows.shape[0] must be a multiple of the {n_windows} windows of a {height}x{width} image, "
            f"got shape {tuple(windows.shape)}"
        )
    impl = reverse_op.select(dispatch.Call(windows.device, windows.dtype), backend)
    return impl(windows, height, width, window, shift)


def _check_window_args(window_size: IntPair, shift_size: IntPair):
    window = to_pair("window_size", window_size)
    shift = to_pair("shift_size", shift_size, minimum=0)
    if shift[0] >= window[0] or shift[1] >= window[1]:
        raise ValueError(f"shift_size must be smaller than window_size, got shift {shift} for window {window}")
    return list(window), list(shift)


def _num_windows(height, width, window_size: Sequence[int]):
    return -(-height // window_size[0]) * -(-width // window_size[1])


# --- reference backend --------------------------------------------------------------------------------------------

@partition_op.register("reference")
def _partition_reference(x, window_size, shift_size):
    return reference.window_partition(x, tuple(window_size), tuple(shift_size))


@reverse_op.register("reference")
def _reverse_reference(windows, height, width, window_size, shift_size):
    return reference.window_reverse(windows, height, width, tuple(window_size), tuple(shift_size))


# --- fake implementations and autograd, shared by the native and triton ops ----------------------------------------

def _partition_fake(x, window_size, shift_size):
    B, H, W, C = x.shape
    return x.new_empty((B * _num_windows(H, W, window_size), window_size[0] * window_size[1], C))


def _reverse_fake(windows, height, width, window_size, shift_size):
    B = windows.shape[0] // _num_windows(height, width, window_size)
    return windows.new_empty((B, height, width, windows.shape[2]))


def _register_fake_and_autograd(partition, reverse) -> None:
    """Register fakes and autograd for a (partition, reverse) op pair; each is the other's backward."""

    def partition_setup(ctx, inputs, output):
        x, ctx.window_size, ctx.shift_size = inputs
        ctx.height, ctx.width = x.shape[1], x.shape[2]

    def partition_backward(ctx, grad):
        return reverse(grad.contiguous(), ctx.height, ctx.width, ctx.window_size, ctx.shift_size), None, None

    def reverse_setup(ctx, inputs, output):
        _, _, _, ctx.window_size, ctx.shift_size = inputs

    def reverse_backward(ctx, grad):
        return partition(grad.contiguous(), ctx.window_size, ctx.shift_size), None, None, None, None

    torch.library.register_fake(partition)(_partition_fake)
    torch.library.register_fake(reverse)(_reverse_fake)
    torch.library.register_autograd(partition, partition_backward, setup_context=partition_setup)
    torch.library.register_autograd(reverse, reverse_backward, setup_context=reverse_setup)


# --- native backend: csrc/cpu/window_partition.cpp, csrc/cuda/window_partition.cpp ----------------------------------

if _native.is_loaded():
    _register_fake_and_autograd(torch.ops.vitkernels.window_partition.default, torch.ops.vitkernels.window_reverse.default)

    @partition_op.register("native", lambda call: _native.native_unavailable_reason("window_partition", call.device))
    def _partition_native(x, window_size, shift_size):
        return torch.ops.vitkernels.window_partition(x, window_size, shift_size)

    @reverse_op.register("native", lambda call: _native.native_unavailable_reason("window_reverse", call.device))
    def _reverse_native(windows, height, width, window_size, shift_size):
        return torch.ops.vitkernels.window_reverse(windows, height, width, window_size, shift_size)

else:
    partition_op.mark_missing("native", _native.IMPORT_ERROR)
    reverse_op.mark_missing("native", _native.IMPORT_ERROR)


# --- triton backend: vitkernels/triton/window_partition.py --------------------------------------------------------

if HAS_TRITON:
    from vitkernels.ops._library import kernel_op
    from vitkernels.triton import window_partition as triton_kernels

    @kernel_op("vitkernels::triton_window_partition")
    def triton_window_partition(x: torch.Tensor, window_size: List[int], shift_size: List[int]) -> torch.Tensor:
        if x.numel() == 0:  # B == 0 or C == 0: no kernel launch (its tiles are sized by C)
            return _partition_fake(x, window_size, shift_size)
        return triton_kernels.window_partition(x, window_size, shift_size)

    @kernel_op("vitkernels::triton_window_reverse")
    def triton_window_reverse(
        windows: torch.Tensor, height: int, width: int, window_size: List[int], shift_size: List[int]
    ) -> torch.Tensor:
        if windows.numel() == 0:
            return _reverse_fake(windows, height, width, window_size, shift_size)
        return triton_kernels.window_reverse(windows, height, width, window_size, shift_size)

    _register_fake_and_autograd(triton_window_partition, triton_window_reverse)

    partition_op.register("triton", lambda call: triton_unavailable_reason(call.device))(triton_window_partition)
    reverse_op.register("triton", lambda call: triton_unavailable_reason(call.device))(triton_window_reverse)
else:
    partition_op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))
    reverse_op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))
