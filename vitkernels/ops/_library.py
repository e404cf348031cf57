"""torch.library helpers shared by the op files."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from vitkernels.triton import interpreter_active


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records an op on ``tensors`` (None allowed): a forward then saves state for a backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def takes_eager_autograd(eager_op, t: torch.Tensor) -> bool:
    """Whether a call on ``t`` goes to ``eager_op``, a native op's ``vitkernels::<op>_eager`` twin (the same op
    recorded by a C++ autograd Function, ~0.1-0.2 ms of Python less per forward + backward than the op's registered
    autograd; None where vitkernels._C predates it): in eager mode on CPU. torch.compile traces the op and its
    registered autograd instead (it cannot trace a C++ autograd Function), and so do functorch transforms."""
    return (eager_op is not None and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


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


def keep_softmax_state_out_of_autograd(ctx, state: torch.Tensor) -> None:
    """In an attention op's ``setup_context``: its softmax state output (row log-sum-exp or saved softmax) is the
    backward's input, not a result to differentiate (the gradient formula has no term for it).

    Marked non-differentiable (it does not require grad), and unused output gradients are left None instead of
    materialized: autograd then does not allocate and zero-fill a gradient the size of the state on every backward
    (4.8 MB per Swin-T stage-1 block at batch 2 for a saved softmax). The backward must then accept
    ``grad_out=None`` (the output itself unused) and return no gradients.
    """
    ctx.mark_non_differentiable(state)
    ctx.set_materialize_grads(False)


def refuse_double_backward(backward_op, op_name: str, backend: str) -> None:
    """Make differentiating ``backward_op`` (a second-order gradient through ``op_name``) raise a clear error.

    Without this, a C++ backward op without an autograd kernel silently contributes zeros to a second-order
    gradient (PyTorch only warns), and a Python custom op raises a generic "no autograd formula" message. The error
    is raised when the second backward reaches the op, so ``create_graph=True`` alone (e.g. for a gradient that is
    never differentiated again) still works.
    """

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"double backward (a second-order gradient) is not supported by the {backend} backend of {op_name}; "
            "use backend='reference' for higher-order gradients"
        )

    torch.library.register_autograd(backward_op, backward, setup_context=setup_context)
