"""Reference: a post-norm residual branch, ``residual + scale * LayerNorm(y + bias)``.

The seam of a res-post-norm block (Swin V2): ``x + drop_path(norm(linear(h)))``, where ``y`` is the Linear's product
without its bias and ``scale`` the per-sample factor timm's ``DropPath`` multiplies the branch by (``None`` when drop
path is off or in eval mode).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkernels.reference.bias_residual import sample_scale


def bias_layernorm_residual(
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(N, ..., C) ``y`` and ``residual``, (C,) ``bias``, ``weight``, ``ln_bias``, (N,) ``scale`` ->
    ``residual + scale * (LayerNorm(y + bias) * weight + ln_bias)``, normalised over the last dim."""
    x1 = y if bias is None else y + bias
    branch = F.layer_norm(x1, (x1.shape[-1],), weight, ln_bias, eps)
    if scale is not None:
        branch = branch * sample_scale(scale, y.dim())
    return residual + branch
