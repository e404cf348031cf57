"""torch.library helpers shared by the op files."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from vitkernels.triton import interpreter_active


def kernel_op(qualname: str, *, mutates_args: Iterable[str] = ()) -> Callable[[Callable], "torch.library.CustomOpDef"]:
    """Define a custom op whose body launches Triton kernels.

    On a GPU this is ``torch.library.triton_op``, so torch.compile sees the kernels (through ``wrap_triton``) and can
    schedule around them. Under the Triton interpreter that path cannot trace (the interpreter needs real data
    pointers), so the op is an opaque ``torch.library.custom_op`` instead. Either way the caller registers a fake
    implementation and autograd on the returned op, and ``torch.compile(fullgraph=True)`` sees no graph break.
    """

    def decorator(fn: Callable) -> "torch.library.CustomOpDef":
        if interpreter_active():
            return torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(fn)
        return torch.library.triton_op(qualname, mutates_args=tuple(mutates_args))(fn)

    return decorator
