"""Launching Triton kernels from host code that may be traced by torch.compile."""
from __future__ import annotations

import torch

from vitkernels.triton import interpreter_active


def launcher(kernel):
    """``kernel`` wrapped for launch from a ``torch.library.triton_op`` body.

    ``wrap_triton`` lets torch.compile see the kernel inside a ``triton_op``; the interpreter cannot run under it,
    so there the raw kernel is launched (and the op is registered as an opaque ``custom_op``, see
    :func:`vitkernels.ops._library.kernel_op`).
    """
    if interpreter_active():
        return kernel
    return torch.library.wrap_triton(kernel)


def max_grid_dim_y() -> int:
    """CUDA's limit on grid dimensions 1 and 2 (dimension 0 allows 2**31 - 1 programs)."""
    return 65535
