"""Shifted-window attention in the "pad, then shift" order of Hugging Face's and MONAI's Swin blocks, on the fused op.

The op :func:`vitkernels.ops.window_attention.window_attention` pads *after* its cyclic shift (timm's order). Hugging
Face (``SwinLayer.maybe_pad`` then ``cyclic_shift``) and MONAI (``SwinTransformerBlock.forward_part1``) pad the
normalised map with zeros *first* and roll the padded map, so the padded tokens are rolled with the rest. The two
orders agree when the map is a whole number of windows or there is no shift; otherwise this pads the normalised map
here (one copy, as those models do) and hands the op a map with nothing left to pad.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vitkernels.ops.window_attention import window_attention
from vitkernels.reference.window_partition import padded_size


def window_attention_pad_first(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    relative_position_bias_table: torch.Tensor,
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    num_heads: int,
    scale: float,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Window attention of the normalised map ``x`` (B, H, W, C), before the output projection.

    ``qkv = x @ qkv_weight^T + qkv_bias`` (weight (3 * nH * hd, C), rows q, k, v by head); the map is padded with
    zeros at the bottom/right to whole windows *before* the cyclic shift (padded tokens carry q, k, v =
    ``qkv_bias``); shifted-window attention with the relative position bias and the -100 mask; reverse shift,
    crop. Returns (B, H, W, nH * hd) in original token order.
    """
    B, H, W, _ = x.shape
    Hp, Wp = padded_size(H, W, window_size)
    if (Hp, Wp) != (H, W) and any(shift_size):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        out = window_attention(F.linear(x, qkv_weight, qkv_bias), relative_position_bias_table, window_size,
                               shift_size, num_heads, scale, backend=backend)
        return out[:, :H, :W]
    # no shift, or nothing to pad: the op's own padding (after its shift) is the same, with padded tokens = qkv_bias
    return window_attention(F.linear(x, qkv_weight, qkv_bias), relative_position_bias_table, window_size, shift_size,
                            num_heads, scale, qkv_bias, backend=backend)
