"""A drop-in ``nn.Linear`` whose forward runs :func:`vitkernels.ops.linear.linear` (CPU float32: oneDNN).

Same constructor, parameters and state dict as ``nn.Linear`` (it is a subclass and adds no state), so an existing
model's Linears can become one in place by a class swap (``module.__class__ = Linear``, what
:func:`vitkernels.compat.timm.patch_model` does): nothing is re-allocated and optimizers keep their parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitkernels import dispatch
from vitkernels.ops.linear import linear


class Linear(nn.Linear):
    """``nn.Linear`` through the vitkernels linear op. ``backend`` (class default None: ``$VITKERNELS_BACKEND`` or
    ``auto``) is a plain attribute, so a class-swapped module has it too. ``"reference"`` pins ``F.linear``; any
    other value means ``auto`` (oneDNN where it serves the call, else ``F.linear``): a model pinned to ``triton`` or
    ``native`` by ``patch_model(model, backend=...)`` pins its attention kernels, and its Linears -- for which there
    is no Triton GEMM (cuBLAS is the one to use) and no float64 oneDNN path -- must not fail on that."""

    backend: Optional[str] = None

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if dispatch.resolve_backend_name(backend) != "reference":
            backend = "auto"
        return linear(input, self.weight, self.bias, backend=backend)
