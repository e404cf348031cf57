"""Reference: residual branch (bias, drop-path scale, residual add) followed by a LayerNorm of the sum.

The seam between a transformer block's attention and MLP: ``x1 = x + drop_path(proj(o))`` then ``norm2(x1)``, where
``y`` is the proj product without its bias. Returns both ``x1`` (the MLP branch's residual) and the normalised rows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vitkernels.reference.bias_residual import bias_residual


def bias_residual_layernorm(
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, ..., C) -> (x1, LayerNorm(x1)): ``x1 = residual + scale * (y + bias)``, normalised over the last dim."""
    x1 = bias_residual(y, bias, residual, scale)
    return x1, F.layer_norm(x1, (x1.shape[-1],), weight, ln_bias, eps)
