"""A drop-in ``nn.Linear`` whose forward runs :func:`vitkernels.ops.linear.linear` (CPU float32: oneDNN).

Same constructor, parameters and state dict as ``nn.Linear`` (it is a subclass and adds no state), so an existing
model's Linears can become one in place by a class swap (``module.__class__ = Linear``, what
:func:`vitkernels.compat.timm.patch_model` does): nothing is re-allocated and optimizers keep their parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitkernels.ops.linear import layer_backend, layer_linear, linear


class Linear(nn.Linear):
    """``nn.Linear`` through the vitkernels linear op. ``backend`` (class default None: ``$VITKERNELS_BACKEND`` or
    ``auto``) is a plain attribute, so a class-swapped module has it too; it maps to the op's backend by
    :func:`vitkernels.ops.linear.layer_backend` (``"reference"`` pins ``F.linear``, anything else is ``auto``)."""

    backend: Optional[str] = None

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # off the CPU every backend is F.linear, which layer_linear calls directly, without the op's Python checks
        # and selection (they cost more than a small GEMM's launch: DeiT-S on an H200 is launch-bound, timm eager
        # 10.9 ms against 3.7 ms of GEMMs at batch 128)
        if input.device.type != "cpu" or layer_backend(self.backend) == "auto":
            return layer_linear(input, self.weight, self.bias)
        return linear(input, self.weight, self.bias, backend="reference")
