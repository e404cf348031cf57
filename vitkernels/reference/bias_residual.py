"""Reference: a residual branch's bias, drop-path scale and residual add, ``residual + scale * (y + bias)``.

In a transformer block ``x + drop_path(fc2(h))``: ``y`` is fc2's product without its bias, ``scale`` the per-sample
factor timm's ``DropPath`` multiplies the branch by (0 or 1 / keep_prob, drawn with the same ``bernoulli_`` call;
``None`` when drop path is off or in eval mode).
"""
from __future__ import annotations

from typing import Optional

import torch


def sample_scale(scale: Optional[torch.Tensor], ndim: int) -> Optional[torch.Tensor]:
    """(N,) per-sample factors viewed to broadcast over an ``ndim``-dimensional (N, ...) tensor."""
    return None if scale is None else scale.reshape((-1,) + (1,) * (ndim - 1))


def bias_residual(
    y: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(N, ..., C) ``y`` and ``residual``, (C,) ``bias``, (N,) ``scale`` -> ``residual + scale * (y + bias)``."""
    branch = y if bias is None else y + bias
    if scale is not None:
        branch = branch * sample_scale(scale, y.dim())
    return residual + branch
