"""Reference: a transformer MLP with a GELU, ``gelu(x W1^T + b1) W2^T + b2``.

timm's ``Mlp`` (``fc1 -> GELU -> fc2``, dropouts inactive, no norm) as one function: x (..., C), w1 (H, C), b1 (H,),
w2 (N, H), b2 (N,), ``approximate`` as :func:`torch.nn.functional.gelu`. The biases are optional.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gelu_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    approximate: str = "none",
) -> torch.Tensor:
    """(..., C) -> (..., N): ``fc2(gelu(fc1(x)))``."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
