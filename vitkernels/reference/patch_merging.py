"""Reference: Swin patch merging's gather + LayerNorm (timm ``PatchMerging`` without its reduction Linear).

``x`` (B, H, W, C) is zero-padded to even H, W; each 2x2 neighbourhood of (2i, 2j) becomes one row of 4C channels in
timm's order (0,0), (1,0), (0,1), (1,1) as (dy, dx); the rows are LayerNorm-ed over the 4C channels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def merge_patches(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C): timm's pad + reshape + permute + flatten."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    _, H, W, _ = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


def patch_merging_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5
) -> torch.Tensor:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C): the merged 2x2 neighbourhoods, LayerNorm-ed."""
    merged = merge_patches(x)
    return F.layer_norm(merged, (merged.shape[-1],), weight, bias, eps)
