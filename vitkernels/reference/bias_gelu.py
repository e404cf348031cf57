"""Reference: bias add + GELU, the activation of a transformer MLP's first Linear.

``gelu(x + bias)`` over the last dimension, ``approximate`` as :func:`torch.nn.functional.gelu` ("none": the exact
erf form, "tanh"). timm's ``Mlp`` computes ``act(fc1(x))`` with fc1's bias inside the Linear; the fused CPU op runs
fc1 as a plain GEMM and adds its bias here instead (same value: the bias is added to the product either way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """(..., C), (C,) -> (..., C): ``gelu(x + bias)``."""
    return F.gelu(x + bias, approximate=approximate)
