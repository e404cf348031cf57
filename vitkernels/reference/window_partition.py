"""Reference: Swin's cyclic shift + window partition, and its inverse.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021, Sec. 3.2.
Exactly the steps of timm's ``SwinTransformerBlock._attn`` (and the official code), as three separate copies:

* partition: ``x`` (B, H, W, C) -> roll by (-shift_h, -shift_w) over (H, W) -> zero-pad bottom/right to
  (Hp, Wp) = multiples of the window -> windows (B * nWh * nWw, wh * ww, C), window-major, row-major inside.
* reverse: windows -> (B, Hp, Wp, C) -> crop to (H, W) -> roll by (+shift_h, +shift_w).

``window_reverse`` is the adjoint of ``window_partition`` (each is the other's backward), and
``window_reverse(window_partition(x)) == x``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from vitkernels.geometry import padded_size


def window_partition(x: torch.Tensor, window_size: Tuple[int, int], shift_size: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """(B, H, W, C) -> (B * nWh * nWw, wh * ww, C): roll by -shift, zero-pad to whole windows, partition."""
    B, H, W, C = x.shape
    wh, ww = window_size
    if shift_size[0] or shift_size[1]:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    Hp, Wp = padded_size(H, W, window_size)
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * (Hp // wh) * (Wp // ww), wh * ww, C)  # explicit sizes: B == 0 or C == 0 work too


def window_reverse(
    windows: torch.Tensor,
    height: int,
    width: int,
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """(B * nWh * nWw, wh * ww, C) -> (B, height, width, C): merge windows, crop the padding, roll by +shift."""
    wh, ww = window_size
    C = windows.shape[-1]
    Hp, Wp = padded_size(height, width, window_size)
    B = windows.shape[0] // ((Hp // wh) * (Wp // ww))
    x = windows.view(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    x = x[:, :height, :width, :]
    if shift_size[0] or shift_size[1]:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x.contiguous()
