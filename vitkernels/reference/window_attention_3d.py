"""Reference: 3D (volumetric / video) shifted-window attention with relative position bias.

Liu et al., "Video Swin Transformer", CVPR 2022; Hatamizadeh et al., "Swin UNETR", BrainLes 2021. The same arithmetic
as MONAI's ``monai.networks.nets.swin_unetr`` (``SwinTransformerBlock.forward_part1``, ``WindowAttention``,
``compute_mask``, ``get_window_size``) and the official Video Swin ``SwinTransformerBlock3D``. This is the
specification of the fused 3D op to come (fwd + bwd in every backend); :func:`window_attention_3d` starts, like the
2D op :func:`vitkernels.reference.window_attention.window_attention`, from the qkv Linear's output in the *original*
token order and ends before the output projection:

    qkv (B, D, H, W, 3*nH*hd)  --pad, roll(-shift), partition-->  windows (B*nW, N, 3*nH*hd),  N = wd*wh*ww
    q, k, v = split into heads (channel c = s*nH*hd + h*hd + d for s in q,k,v)
    attn = softmax((q * scale) @ k^T + bias[h, i, j] + mask[w, i, j])          per window w and head h
    out  = attn @ v  -> (B*nW, N, nH*hd)  --reverse, roll(+shift), crop-->  (B, D, H, W, nH*hd)

* Windows are ``(wd, wh, ww)``, shifts ``(sd, sh, sw)`` with ``0 <= s < w`` per axis. Windows are numbered
  depth-major (d, then h, then w) within each image, tokens row-major (d, h, w) within a window.
* ``bias[h, i, j] = table[index[i, j], h]`` with the ((2wd-1)(2wh-1)(2ww-1), nH) table and the index of
  :func:`relative_position_index_3d`: ``(dd + wd-1)(2wh-1)(2ww-1) + (dh + wh-1)(2ww-1) + (dw + ww-1)`` for the
  offset ``(dd, dh, dw) = token i - token j``.
* ``mask`` (when any shift is non-zero) is -100 between tokens of different regions of the shifted volume, else 0.
  Per axis, with padded length P, window w, shift s: ``region(p) = 0 if p < P - w, 1 if p < P - s, else 2``, and a
  constant when ``s == 0`` (the slice ``[-0:]`` then covers the whole axis); the region of a token is
  ``9 * region_d + 3 * region_h + region_w``: 27 regions. Padded coordinates are used, so the mask depends on
  (Dp, Hp, Wp), not on (D, H, W).
* Padding: D, H, W that are not multiples of the window are padded at the end to (Dp, Hp, Wp). MONAI, Video Swin
  (and Hugging Face's 2D Swin) pad *before* the shift (``pad_before_shift=True``, the default): the padded tokens
  are rolled with the rest. timm's 2D Swin (and the 2D op) pads *after* the shift (``pad_before_shift=False``).
  The models pad the normalised input with zeros before the qkv Linear, so padded tokens carry q, k, v = the
  Linear's bias: pass ``qkv_bias`` to reproduce that (None: zeros). Padded tokens are keys/values like any other
  (not masked) and their outputs are cropped.
* The window and shift a module uses come from :func:`effective_window_and_shift` (MONAI ``get_window_size``): on an
  axis whose size is ``<=`` the window, the window shrinks to the size and that axis' shift is dropped.
* MONAI quirk: MONAI's ``WindowAttention`` gathers the bias of a shrunk window ``(wd', wh', ww')`` with its
  full-window index sliced to ``index[:n, :n]`` (n = wd'wh'ww'), i.e. token t of the shrunk window is given the
  full window's coordinates of token t. ``relative_position_index`` lets the reference reproduce that
  (:func:`monai_relative_position_index`); it equals a standard index into a sliced table only when the first
  axis alone shrinks (:func:`monai_equivalent_table`).

A 2D map is the case D = 1, wd = 1, sd = 0 (the table then has (2wh-1)(2ww-1) rows, indexed as the 2D op's).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vitkernels.reference.window_attention import MASK_VALUE, attention_in_windows, relative_position_bias

Triple = Tuple[int, int, int]


def effective_window_and_shift(size: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]):
    """The window and shift used on a map of ``size`` (MONAI ``get_window_size``, timm's per-axis clamp): on each axis
    where ``size <= window`` the window becomes ``size`` and the shift 0. Returns two tuples."""
    window, shift = list(window_size), list(shift_size)
    for axis, length in enumerate(size):
        if length <= window[axis]:
            window[axis] = length
            shift[axis] = 0
    return tuple(window), tuple(shift)


def padded_size_3d(size: Sequence[int], window_size: Sequence[int]) -> Triple:
    """(Dp, Hp, Wp): the volume rounded up to whole windows (axis by axis: (Hp, Wp) for a 2D map's two axes)."""
    return tuple(-(-n // w) * w for n, w in zip(size, window_size))


def relative_position_index_3d(window_size: Sequence[int], device=None) -> torch.Tensor:
    """(N, N) int64 index into the ((2wd-1)(2wh-1)(2ww-1), nH) table for every pair of tokens in a window.

    ``index[i, j] = (di - dj + wd-1)(2wh-1)(2ww-1) + (hi - hj + wh-1)(2ww-1) + (wi - wj + ww-1)`` (MONAI / Video Swin).
    """
    wd, wh, ww = window_size
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.long) for n in (wd, wh, ww)), indexing="ij")
    ).flatten(1)  # 3, N
    relative = coords[:, :, None] - coords[:, None, :]  # 3, N, N
    return (
        (relative[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1)
        + (relative[1] + wh - 1) * (2 * ww - 1)
        + (relative[2] + ww - 1)
    )


def monai_relative_position_index(module_window: Sequence[int], window_size: Sequence[int], device=None) -> torch.Tensor:
    """The (n, n) index MONAI's ``WindowAttention`` (built for ``module_window``) uses for a window shrunk to
    ``window_size``: its full index sliced to ``[:n, :n]``. 2D or 3D windows."""
    n = 1
    for w in window_size:
        n *= w
    if len(module_window) == 3:
        full = relative_position_index_3d(module_window, device=device)
    else:
        full = relative_position_index_3d((1, *module_window), device=device)
    return full[:n, :n]


def monai_equivalent_table(
    table: torch.Tensor, module_window: Sequence[int], window_size: Sequence[int]
) -> Optional[torch.Tensor]:
    """A table for the standard index of ``window_size`` that gives exactly MONAI's bias for a window shrunk from
    ``module_window`` (see :func:`monai_relative_position_index`), or None when there is none.

    MONAI's sliced index is the standard one when the shrunk window's first ``n`` tokens in the full window's
    row-major order are the shrunk box itself: only the first axis may shrink. The table is then the central slab
    of the full table along that axis (offsets ``-(w'-1) .. w'-1`` of ``-(w-1) .. w-1``); a slice, so gradients reach
    the parameter. 2D or 3D windows.
    """
    module_window, window_size = tuple(module_window), tuple(window_size)
    if window_size == module_window:
        return table
    if window_size[1:] != module_window[1:]:
        return None
    w, w_new = module_window[0], window_size[0]
    rows_per_offset = table.shape[0] // (2 * w - 1)
    return table[(w - w_new) * rows_per_offset:(w + w_new - 1) * rows_per_offset]


def shifted_window_mask_3d(
    padded_size: Sequence[int],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Optional[torch.Tensor]:
    """(nW, N, N) additive mask (0 within a region, -100 across) of the (Dp, Hp, Wp) padded volume, or None if no
    shift. Built as MONAI ``compute_mask`` / Video Swin: label the volume's 27 regions by slices, partition into
    windows, compare labels pairwise."""
    if not any(shift_size):
        return None
    img_mask = torch.zeros((1, *padded_size, 1), dtype=dtype, device=device)
    slices = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window_size, shift_size)]
    label = 0
    for d in slices[0]:
        for h in slices[1]:
            for w in slices[2]:
                img_mask[:, d, h, w, :] = label
                label += 1
    windows = window_partition_3d(img_mask, window_size).squeeze(-1)  # nW, N
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, MASK_VALUE).masked_fill(diff == 0, 0.0)


def window_partition_3d(
    x: torch.Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int] = (0, 0, 0),
    pad_before_shift: bool = True,
) -> torch.Tensor:
    """(B, D, H, W, C) -> (B * nWd * nWh * nWw, wd * wh * ww, C): pad with zeros to whole windows and roll by -shift
    (in the order given by ``pad_before_shift``), then partition (windows depth-major, tokens row-major)."""
    B, D, H, W, C = x.shape
    wd, wh, ww = window_size
    Dp, Hp, Wp = padded_size_3d((D, H, W), window_size)
    shifted = any(shift_size)
    if shifted and not pad_before_shift:
        x = torch.roll(x, shifts=tuple(-s for s in shift_size), dims=(1, 2, 3))
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H, 0, Dp - D))
    if shifted and pad_before_shift:
        x = torch.roll(x, shifts=tuple(-s for s in shift_size), dims=(1, 2, 3))
    x = x.view(B, Dp // wd, wd, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, C)


def window_reverse_3d(
    windows: torch.Tensor,
    size: Sequence[int],
    window_size: Sequence[int],
    shift_size: Sequence[int] = (0, 0, 0),
    pad_before_shift: bool = True,
) -> torch.Tensor:
    """(B * nW, wd * wh * ww, C) -> (B, D, H, W, C) for ``size = (D, H, W)``: the inverse of
    :func:`window_partition_3d` (merge, roll by +shift, crop, in the matching order)."""
    D, H, W = size
    wd, wh, ww = window_size
    Dp, Hp, Wp = padded_size_3d(size, window_size)
    C = windows.shape[-1]
    x = windows.view(-1, Dp // wd, Hp // wh, Wp // ww, wd, wh, ww, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(-1, Dp, Hp, Wp, C)
    shifted = any(shift_size)
    if shifted and pad_before_shift:
        x = torch.roll(x, shifts=tuple(shift_size), dims=(1, 2, 3))
    x = x[:, :D, :H, :W, :]
    if shifted and not pad_before_shift:
        x = torch.roll(x, shifts=tuple(shift_size), dims=(1, 2, 3))
    return x.contiguous()


def window_attention_3d(
    qkv: torch.Tensor,
    relative_position_bias_table: torch.Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    scale: float,
    qkv_bias: Optional[torch.Tensor] = None,
    *,
    pad_before_shift: bool = True,
    relative_position_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """3D shifted-window attention from qkv in original (B, D, H, W) order to the attention output in original order.

    Args:
        qkv: (B, D, H, W, 3*nH*hd), the qkv Linear applied to the (normalised) unshifted volume.
        relative_position_bias_table: ((2wd-1)*(2wh-1)*(2ww-1), nH).
        window_size: (wd, wh, ww). shift_size: (sd, sh, sw), 0 <= shift < window per axis.
        num_heads: nH. scale: multiplies q (MONAI: hd ** -0.5).
        qkv_bias: (3*nH*hd,) value of padded tokens (the qkv Linear's bias), or None for zeros.
        pad_before_shift: True (MONAI, Video Swin): pad, then roll; False (timm's 2D order): roll, then pad.
        relative_position_index: (N, N) index into the table replacing :func:`relative_position_index_3d` (MONAI's
            shrunk-window quirk, :func:`monai_relative_position_index`); None for the standard index.
    Returns:
        (B, D, H, W, nH*hd) in qkv's dtype.
    """
    B, D, H, W, _ = qkv.shape
    window_size, shift_size = tuple(window_size), tuple(shift_size)
    for w, s in zip(window_size, shift_size):
        if not 0 <= s < w:
            raise ValueError(f"shift_size must satisfy 0 <= shift < window per axis, got {shift_size} for {window_size}")
    padded = padded_size_3d((D, H, W), window_size)
    windows = window_partition_3d(qkv, window_size, shift_size, pad_before_shift)
    if qkv_bias is not None and padded != (D, H, W):
        is_pad = window_partition_3d(qkv.new_ones(1, D, H, W, 1), window_size, shift_size, pad_before_shift) == 0
        windows = torch.where(is_pad.repeat(B, 1, 1), qkv_bias.to(qkv.dtype), windows)
    index = relative_position_index
    if index is None:
        index = relative_position_index_3d(window_size, device=qkv.device)
    bias = relative_position_bias(relative_position_bias_table, index).to(qkv.dtype)
    mask = shifted_window_mask_3d(padded, window_size, shift_size, device=qkv.device, dtype=qkv.dtype)
    out = attention_in_windows(windows, bias, mask, num_heads, scale)
    return window_reverse_3d(out, (D, H, W), window_size, shift_size, pad_before_shift)
