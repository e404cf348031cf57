"""Op: bias add + GELU, ``gelu(x + bias)`` (see :mod:`vitkernels.reference.bias_gelu`).

Backends: ``reference`` (PyTorch) and ``native`` (``torch.ops.vitkernels.bias_gelu`` from ``csrc/cpu/bias_gelu.cpp``,
CPU: one pass, no broadcast copy of the bias; its backward is one pass that also sums the bias gradient). The
native op has a fake implementation and autograd, and an in-place variant ``bias_gelu_`` for inference.
"""
from __future__ import annotations

from typing import Optional

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import check_same_device, check_shape, check_tensor
from vitkernels.ops._library import refuse_double_backward
from vitkernels.reference import bias_gelu as reference

op = dispatch.op("bias_gelu", "gelu(x + bias) over the last dim (an MLP's fc1 bias + activation)")

APPROXIMATIONS = ("none", "tanh")


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor, approximate: str = "none", *, backend: Optional[str] = None
) -> torch.Tensor:
    """``gelu(x + bias)``.

    Args:
        x: (..., C), e.g. an MLP's first Linear without its bias.
        bias: (C,).
        approximate: ``"none"`` (erf) or ``"tanh"``, as :func:`torch.nn.functional.gelu`.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (..., C), dtype of ``x``.
    """
    check_tensor("x", x)
    check_tensor("bias", bias, ndim=1)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    check_shape("bias", bias, (x.shape[-1],), "x.shape[-1]")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    check_same_device(x=x, bias=bias)
    return op.select(dispatch.Call(x.device, x.dtype), backend)(x, bias, approximate)


@op.register("reference")
def _bias_gelu_reference(x, bias, approximate):
    return reference.bias_gelu(x, bias, approximate)


if _native.is_loaded():
    _forward = torch.ops.vitkernels.bias_gelu.default

    @torch.library.register_fake("vitkernels::bias_gelu")
    def _bias_gelu_fake(x, bias, approximate):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("vitkernels::bias_gelu_")
    def _bias_gelu_inplace_fake(x, bias, approximate):
        return None

    @torch.library.register_fake("vitkernels::bias_gelu_backward")
    def _bias_gelu_backward_fake(grad, x, bias, approximate):
        return torch.empty_like(x, memory_format=torch.contiguous_format), bias.new_empty(bias.shape)

    def _setup_context(ctx, inputs, output):
        x, bias, ctx.approximate = inputs
        ctx.save_for_backward(x, bias)

    def _backward(ctx, grad):
        x, bias = ctx.saved_tensors
        grad_x, grad_bias = torch.ops.vitkernels.bias_gelu_backward(grad, x, bias, ctx.approximate)
        return grad_x, (grad_bias.to(bias.dtype) if ctx.needs_input_grad[1] else None), None

    torch.library.register_autograd(_forward, _backward, setup_context=_setup_context)
    # second-order gradients would need the backward of the backward kernel: refused clearly, never silent zeros
    refuse_double_backward(torch.ops.vitkernels.bias_gelu_backward.default, "bias_gelu", "native")

    @op.register("native", lambda call: _native.native_unavailable_reason("bias_gelu", call.device))
    def _bias_gelu_native(x, bias, approximate):
        return _forward(x, bias, approximate)

else:
    op.mark_missing("native", _native.IMPORT_ERROR)
