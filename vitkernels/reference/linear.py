"""Reference: a Linear layer with an optional GELU, ``act(x W^T + b)``.

The specification of :mod:`vitkernels.ops.linear`: :func:`torch.nn.functional.linear`, then (``activation``)
``None``: nothing, ``"gelu"``: the exact erf GELU, ``"gelu_tanh"``: its tanh approximation (``nn.GELU('tanh')``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "gelu", "gelu_tanh")
GELU_APPROXIMATION = {"gelu": "none", "gelu_tanh": "tanh"}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None) -> torch.Tensor:
    """(..., K), (N, K), (N,) or None -> (..., N): ``act(x @ weight^T + bias)``."""
    y = F.linear(x, weight, bias)
    if activation is None:
        return y
    return F.gelu(y, approximate=GELU_APPROXIMATION[activation])
