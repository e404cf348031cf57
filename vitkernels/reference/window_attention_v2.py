"""Reference: Swin V2 (shifted) window attention -- scaled cosine attention with a continuous position bias.

Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022, Sec. 3.2-3.3; the same arithmetic
as timm's ``swin_transformer_v2.WindowAttention`` inside ``SwinTransformerV2Block._attn``.

The op :func:`window_attention_v2` starts, like V1's :func:`~vitkernels.reference.window_attention.window_attention`,
from the output of the qkv Linear in the *original* token order and ends before the output projection; the shift,
padding, partition and mask are V1's (:mod:`vitkernels.reference.window_partition`,
:func:`~vitkernels.reference.window_attention.shifted_window_mask`). Per window w and head h:

    q^ = q / max(|q|, 1e-12),  k^ = k / max(|k|, 1e-12)                       (F.normalize over head_dim)
    attn = softmax(scale[h] * q^ k^T + bias_table[index[i, j], h] + mask[w, i, j]),   out = attn @ v

* ``scale`` (nH,) is timm's ``exp(clamp(logit_scale, max=log(1 / 0.01)))`` (:func:`cosine_scale`).
* ``bias_table`` ((2wh-1)(2ww-1), nH) is timm's ``16 * sigmoid(cpb_mlp(relative_coords_table))``
  (:func:`continuous_position_bias_table`) over the log-spaced coordinates of :func:`relative_coords_table`; the
  gather by ``relative_position_index`` is V1's. timm squashes after the gather; the sigmoid is elementwise, so
  squashing the table first gives the same numbers.
* Padded tokens (H or W not a multiple of the window; padding after the shift) carry what the qkv Linear gives a
  zero input: ``qkv_bias`` = timm's ``cat(q_bias, k_bias = 0, v_bias)`` (or zeros without a bias). A zero key
  normalises to zero (``F.normalize``'s eps), so a padded key's logit is the bias alone.

The fused backends take ``bias_table`` and ``scale`` as tensors and return their gradients; the cpb MLP, the
sigmoid and the clamp/exp stay in PyTorch autograd around the op.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vitkernels.reference.window_attention import relative_position_bias, relative_position_index, shifted_window_mask
from vitkernels.reference.window_partition import padded_size, window_partition, window_reverse

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm / official: the learned log-scale is clamped at log(100)
NORMALIZE_EPS = 1e-12  # F.normalize's default eps


def relative_coords_table(
    window_size: Tuple[int, int],
    pretrained_window_size: Tuple[int, int] = (0, 0),
    device=None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """(1, 2wh-1, 2ww-1, 2) log-spaced relative coordinates, the cpb MLP's input (timm
    ``WindowAttention._make_pair_wise_relative_positions``).

    The offsets (dy, dx) in [-(w-1), w-1] are divided by ``pretrained_window_size - 1`` when one is given (> 0),
    else by ``window_size - 1`` (at least 1), times 8, then mapped to ``sign(t) * log2(|t| + 1) / log2(8)``.
    """
    wh, ww = window_size
    coords_h = torch.arange(-(wh - 1), wh, device=device, dtype=torch.float32)
    coords_w = torch.arange(-(ww - 1), ww, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    norm_h, norm_w = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    table[:, :, :, 0] /= max(norm_h - 1, 1)
    table[:, :, :, 1] /= max(norm_w - 1, 1)
    table *= 8
    table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
    return table.to(dtype=dtype)


def continuous_position_bias_table(cpb_mlp: torch.nn.Module, coords_table: torch.Tensor, num_heads: int) -> torch.Tensor:
    """((2wh-1)(2ww-1), nH) bias table: ``16 * sigmoid(cpb_mlp(coords_table))`` (the squash of timm's forward)."""
    return 16 * torch.sigmoid(cpb_mlp(coords_table).view(-1, num_heads))


def cosine_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """(nH,) multiplier of the cosine similarities from timm's (nH, 1, 1) ``logit_scale`` parameter:
    ``exp(clamp(logit_scale, max=log(100)))``."""
    return torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp().reshape(-1)


def cosine_attention_in_windows(
    qkv_windows: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor,
    mask: Optional[torch.Tensor],
    num_heads: int,
    attn_drop: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Scaled cosine attention inside each window (timm V2 ``WindowAttention.forward`` minus the two Linears).

    Args:
        qkv_windows: (B_, N, 3*nH*hd) with B_ = batch * nW (window-major within each image).
        bias: (nH, N, N) continuous position bias (already ``16 * sigmoid``).
        scale: (nH,) multiplier of the cosine similarities (:func:`cosine_scale`).
        mask: (nW, N, N) additive mask or None.
    Returns:
        (B_, N, nH*hd).
    """
    B_, N, three_c = qkv_windows.shape
    q, k, v = qkv_windows.reshape(B_, N, 3, num_heads, three_c // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * scale.view(num_heads, 1, 1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        num_windows = mask.shape[0]
        attn = attn.view(-1, num_windows, num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    if attn_drop > 0.0 and training:
        attn = F.dropout(attn, attn_drop, training=True)
    return (attn @ v).transpose(1, 2).reshape(B_, N, three_c // 3)  # not -1: B_ may be 0


def qkv_windows(
    qkv: torch.Tensor,
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    qkv_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, H, W, 3C) -> (B * nW, N, 3C) shifted, padded, partitioned qkv rows; padded rows = ``qkv_bias`` (or 0),
    what the qkv Linear gives timm's zero-padded input."""
    B, H, W, _ = qkv.shape
    windows = window_partition(qkv, window_size, shift_size)
    Hp, Wp = padded_size(H, W, window_size)
    if qkv_bias is not None and (Hp != H or Wp != W):
        is_pad = window_partition(qkv.new_ones(1, H, W, 1), window_size, shift_size) == 0  # nW, N, 1
        windows = torch.where(is_pad.repeat(B, 1, 1), qkv_bias.to(qkv.dtype), windows)
    return windows


def window_attention_v2(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    scale: torch.Tensor,
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    num_heads: int,
    qkv_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Swin V2 shifted-window cosine attention from qkv in original NHWC order to the output in original order.

    Args:
        qkv: (B, H, W, 3*nH*hd), the qkv Linear applied to the unshifted image.
        bias_table: ((2*wh-1)*(2*ww-1), nH) continuous position bias (:func:`continuous_position_bias_table`).
        scale: (nH,) multiplier of the cosine similarities (:func:`cosine_scale`).
        window_size: (wh, ww). shift_size: (sh, sw), 0 <= shift < window.
        num_heads: nH.
        qkv_bias: (3*nH*hd,) value of padded tokens (timm: ``cat(q_bias, k_bias, v_bias)``), or None for zeros.
    Returns:
        (B, H, W, nH*hd) in qkv's dtype.
    """
    B, H, W, _ = qkv.shape
    windows = qkv_windows(qkv, window_size, shift_size, qkv_bias)
    Hp, Wp = padded_size(H, W, window_size)
    index = relative_position_index(window_size[0], window_size[1], device=qkv.device)
    bias = relative_position_bias(bias_table, index).to(qkv.dtype)
    mask = shifted_window_mask(Hp, Wp, window_size, shift_size, device=qkv.device, dtype=qkv.dtype)
    out = cosine_attention_in_windows(windows, bias, scale.to(qkv.dtype), mask, num_heads)
    return window_reverse(out, H, W, window_size, shift_size)
