"""Op: a residual branch's bias, drop-path scale and residual add, ``residual + scale * (y + bias)`` (see
:mod:`vitkernels.reference.bias_residual`).

Backends: ``reference`` and ``native`` (``torch.ops.vitkernels.bias_residual`` from ``csrc/cpu/bias_residual.cpp``,
CPU: one pass; an in-place variant ``bias_residual_`` for inference). The backward is tensor arithmetic: the residual
gets the output gradient as is, ``y`` the same times the scale, the bias its column sums.
"""
from __future__ import annotations

from typing import Optional

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import check_same_device, check_shape, check_tensor
from vitkernels.ops._library import takes_eager_autograd
from vitkernels.reference import bias_residual as reference

op = dispatch.op("bias_residual", "residual + scale * (y + bias) (a residual branch's bias, drop path and add)")


def check_bias_residual_args(y, bias, residual, scale) -> None:
    """The checks shared with :func:`vitkernels.ops.bias_residual_layernorm.bias_residual_layernorm`."""
    check_tensor("y", y)
    if y.dim() < 2:
        raise ValueError(f"y must be (N, ..., C), got shape {tuple(y.shape)}")
    check_tensor("residual", residual)
    check_shape("residual", residual, tuple(y.shape), "y.shape")
    if residual.dtype != y.dtype:
        raise TypeError(f"residual must have y's dtype {y.dtype}, got {residual.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (y.shape[-1],), "y.shape[-1]")
    if scale is not None:
        check_tensor("scale", scale)
        if scale.numel() != y.shape[0]:
            raise ValueError(f"scale must hold one value per sample ({y.shape[0]}), got shape {tuple(scale.shape)}")
    check_same_device(y=y, bias=bias, residual=residual, scale=scale)


def bias_residual(
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``residual + scale * (y + bias)``.

    Args:
        y: (N, ..., C), e.g. a Linear's product without its bias.
        bias: (C,) or None.
        residual: like ``y``.
        scale: (N,) per-sample factors (timm ``DropPath``'s ``bernoulli(keep) / keep``) or None.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (N, ..., C), dtype of ``y``.
    """
    check_bias_residual_args(y, bias, residual, scale)
    return op.select(dispatch.Call(y.device, y.dtype), backend)(y, bias, residual, scale)


@op.register("reference")
def _bias_residual_reference(y, bias, residual, scale):
    return reference.bias_residual(y, bias, residual, scale)


if _native.is_loaded():
    _forward = torch.ops.vitkernels.bias_residual.default

    @torch.library.register_fake("vitkernels::bias_residual")
    def _bias_residual_fake(y, bias, residual, scale):
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    @torch.library.register_fake("vitkernels::bias_residual_")
    def _bias_residual_inplace_fake(y, bias, residual, scale):
        return None

    def _setup_context(ctx, inputs, output):
        y, bias, residual, scale = inputs
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(scale)

    def _backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        grad_y = grad if scale is None else grad * reference.sample_scale(scale, grad.dim()).to(grad.dtype)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.sum(dim=tuple(range(grad.dim() - 1))).to(ctx.bias_dtype)
        return grad_y, grad_bias, grad, None

    torch.library.register_autograd(_forward, _backward, setup_context=_setup_context)

    # None: a vitkernels._C built before the op existed
    _eager = getattr(torch.ops.vitkernels, "bias_residual_eager", None)

    def fused_bias_residual(y, bias, residual, scale):
        """``residual + scale * (y + bias)`` through ``vitkernels::bias_residual_eager`` where
        :func:`takes_eager_autograd` says, else ``vitkernels::bias_residual``: the fused blocks' and the native
        backend's call."""
        if takes_eager_autograd(_eager, y):
            return _eager(y, bias, residual, scale)
        return _forward(y, bias, residual, scale)

    @op.register("native", lambda call: _native.native_unavailable_reason("bias_residual", call.device))
    def _bias_residual_native(y, bias, residual, scale):
        return fused_bias_residual(y, bias, residual, scale)

else:
    op.mark_missing("native", _native.IMPORT_ERROR)
