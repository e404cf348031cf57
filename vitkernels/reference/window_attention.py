"""Reference: Swin (shifted) window attention with relative position bias.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021, Sec. 3.2-3.3;
the same arithmetic as timm's ``WindowAttention`` (non-fused path) inside ``SwinTransformerBlock._attn``.

The op :func:`window_attention` starts from the output of the qkv Linear in the *original* token order and ends
before the output projection, which is what the fused kernels implement:

    qkv (B, H, W, 3*nH*hd)  --roll(-shift), pad, partition-->  windows (B*nW, N, 3*nH*hd),  N = wh*ww
    q, k, v = split into heads (channel c = s*nH*hd + h*hd + d for s in q,k,v)
    attn = softmax((q * scale) @ k^T + bias[h, i, j] + mask[w, i, j])          per window w and head h
    out  = attn @ v  -> (B*nW, N, nH*hd)  --reverse, crop, roll(+shift)-->  (B, H, W, nH*hd)

* ``bias[h, i, j] = table[index[i, j], h]`` with the relative position ``index`` of :func:`relative_position_index`.
* ``mask`` (only when a shift is non-zero) is -100 between tokens of different regions of the shifted image and 0
  otherwise (timm and the official code add -100, not -inf). For the padded, shifted coordinate (r, s) the region is
  ``3 * region(r, Hp, wh, sh) + region(s, Wp, ww, sw)`` with ``region(r, P, w, s) = 0 if r < P - w, 1 if
  r < P - s, else 2``, and a constant when ``s == 0`` (timm's slice ``[-0:]`` then covers the whole axis).
* Padding happens after the shift, at the bottom/right. timm pads the *normalised input* with zeros before the qkv
  Linear, so padded tokens carry q, k, v = the qkv Linear's bias; pass ``qkv_bias`` to reproduce that (no bias: 0).
  Padded tokens are keys/values like any other (timm does not mask them) and their outputs are cropped.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vitkernels.geometry import relative_position_index
from vitkernels.reference.window_partition import padded_size, window_partition, window_reverse

MASK_VALUE = -100.0


def relative_position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the (nH, N, N) bias from ``table`` ((2wh-1)(2ww-1), nH) with the (N, N) ``index``."""
    n = index.shape[0]
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def shifted_window_mask(
    padded_height: int,
    padded_width: int,
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Optional[torch.Tensor]:
    """(nW, N, N) additive mask of shifted-window attention (0 within a region, -100 across), or None if no shift.

    Built exactly as timm ``SwinTransformerBlock.get_attn_mask``: label the (Hp, Wp) padded image with region ids
    by slices, partition into windows, compare ids pairwise.
    """
    if not (shift_size[0] or shift_size[1]):
        return None
    wh, ww = window_size
    sh, sw = shift_size
    img_mask = torch.zeros((1, padded_height, padded_width, 1), dtype=dtype, device=device)
    cnt = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            img_mask[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, window_size).squeeze(-1)  # nW, N
    diff = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, MASK_VALUE).masked_fill(diff == 0, 0.0)


def attention_in_windows(
    qkv_windows: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor],
    num_heads: int,
    scale: float,
    attn_drop: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Multi-head attention inside each window (timm ``WindowAttention.forward`` minus the two Linears).

    Args:
        qkv_windows: (B_, N, 3*nH*hd) with B_ = batch * nW (window-major within each image).
        bias: (nH, N, N) relative position bias.
        mask: (nW, N, N) additive mask or None.
    Returns:
        (B_, N, nH*hd).
    """
    B_, N, three_c = qkv_windows.shape
    q, k, v = qkv_windows.reshape(B_, N, 3, num_heads, three_c // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        num_windows = mask.shape[0]
        attn = attn.view(B_ // num_windows, num_windows, num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(B_, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    if attn_drop > 0.0 and training:
        attn = torch.nn.functional.dropout(attn, attn_drop, training=True)
    return (attn @ v).transpose(1, 2).reshape(B_, N, three_c // 3)


def window_attention(
    qkv: torch.Tensor,
    relative_position_bias_table: torch.Tensor,
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    num_heads: int,
    scale: float,
    qkv_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Shifted-window attention from qkv in original NHWC order to the attention output in original order.

    Args:
        qkv: (B, H, W, 3*nH*hd), the qkv Linear applied to the (normalised) unshifted image.
        relative_position_bias_table: ((2*wh-1)*(2*ww-1), nH).
        window_size: (wh, ww). shift_size: (sh, sw), 0 <= shift < window.
        num_heads: nH. scale: multiplies q (timm: hd ** -0.5).
        qkv_bias: (3*nH*hd,) value of padded tokens (the qkv Linear's bias), or None for zeros.
    Returns:
        (B, H, W, nH*hd) in qkv's dtype.
    """
    B, H, W, three_c = qkv.shape
    windows = window_partition(qkv, window_size, shift_size)
    Hp, Wp = padded_size(H, W, window_size)
    if qkv_bias is not None and (Hp != H or Wp != W):
        is_pad = window_partition(qkv.new_ones(1, H, W, 1), window_size, shift_size) == 0  # nW, N, 1
        is_pad = is_pad.repeat(B, 1, 1)
        windows = torch.where(is_pad, qkv_bias.to(qkv.dtype), windows)
    index = relative_position_index(window_size[0], window_size[1], device=qkv.device)
    bias = relative_position_bias(relative_position_bias_table, index).to(qkv.dtype)
    mask = shifted_window_mask(Hp, Wp, window_size, shift_size, device=qkv.device, dtype=qkv.dtype)
    out = attention_in_windows(windows, bias, mask, num_heads, scale)
    return window_reverse(out, H, W, window_size, shift_size)
