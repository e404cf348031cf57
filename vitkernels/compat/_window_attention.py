"""Shifted-window attention in the "pad, then shift" order of Hugging Face's and MONAI's Swin blocks, on the fused ops.

The ops :func:`vitkernels.ops.window_attention.window_attention` (V1) and ``window_attention_v2`` pad *after* their
cyclic shift (timm's order). Hugging Face (``SwinLayer.maybe_pad`` then ``cyclic_shift``; the V2 layers alike) and
MONAI (``SwinTransformerBlock.forward_part1``) pad the map with zeros *first* and roll the padded map, so the padded
tokens are rolled with the rest. The two orders agree when the map is a whole number of windows or there is no
shift; otherwise the map is padded here (one copy, as those models do) and the op gets a map with nothing left to
pad.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from vitkernels.ops.linear import layer_backend, linear
from vitkernels.ops.window_attention import window_attention
from vitkernels.ops.window_attention_v2 import window_attention_v2
from vitkernels.reference.window_partition import padded_size

def _pad_first(x, qkv_weight, qkv_bias, window_size, shift_size, backend, attend: Callable) -> torch.Tensor:
    """``attend(qkv, padding_value)`` on ``qkv = x @ qkv_weight^T + qkv_bias`` with the map padded before the shift;
    ``padding_value`` is what the op should give tokens it pads itself (None: zeros, or nothing left to pad). The qkv
    projection is the linear op, its backend derived from the layer's ``backend`` by ``layer_backend``."""
    gemm_backend = layer_backend(backend)
    B, H, W, _ = x.shape
    Hp, Wp = padded_size(H, W, window_size)
    if (Hp, Wp) != (H, W) and any(shift_size):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        return attend(linear(x, qkv_weight, qkv_bias, backend=gemm_backend), None)[:, :H, :W]
    # no shift, or nothing to pad: the op's own padding (after its shift) is the same, with padded tokens = qkv_bias
    return attend(linear(x, qkv_weight, qkv_bias, backend=gemm_backend), qkv_bias)


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
    """Swin V1 window attention of the map ``x`` (B, H, W, C), before the output projection.

    ``qkv = x @ qkv_weight^T + qkv_bias`` (weight (3 * nH * hd, C), rows q, k, v by head); the map is padded with
    zeros at the bottom/right to whole windows *before* the cyclic shift (padded tokens carry q, k, v =
    ``qkv_bias``); shifted-window attention with the relative position bias and the -100 mask; reverse shift,
    crop. Returns (B, H, W, nH * hd) in original token order.
    """
    return _pad_first(x, qkv_weight, qkv_bias, window_size, shift_size, backend, lambda qkv, padding: window_attention(
        qkv, relative_position_bias_table, window_size, shift_size, num_heads, scale, padding, backend=backend))


def window_attention_v2_pad_first(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    bias_table: torch.Tensor,
    scale: torch.Tensor,
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    num_heads: int,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Swin V2 (scaled cosine) window attention of ``x`` (B, H, W, C) in the same pad-first order, on
    ``vitkernels.ops.window_attention_v2`` (``bias_table`` = 16 sigmoid(cpb MLP), ``scale`` (nH,) = the clamped,
    exponentiated logit scale). Returns (B, H, W, nH * hd)."""
    return _pad_first(x, qkv_weight, qkv_bias, window_size, shift_size, backend, lambda qkv, padding: window_attention_v2(
        qkv, bias_table, scale, window_size, shift_size, num_heads, padding, backend=backend))
