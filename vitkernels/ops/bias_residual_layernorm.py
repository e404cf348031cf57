"""Op: residual branch (bias, drop-path scale, residual add) + LayerNorm of the sum, ``(x1, LayerNorm(x1))`` with
``x1 = residual + scale * (y + bias)`` (see :mod:`vitkernels.reference.bias_residual_layernorm`).

Backends: ``reference`` and ``native`` (``torch.ops.vitkernels.bias_residual_layernorm`` from
``csrc/cpu/bias_residual_layernorm.cpp``, CPU: each row read once; an in-place variant for inference). Its backward
(one pass) adds the gradient reaching ``x1`` directly to the LayerNorm's input gradient and sums the bias and
LayerNorm parameter gradients on the way.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import check_shape, check_tensor
from vitkernels.ops._library import refuse_double_backward, takes_eager_autograd
from vitkernels.ops.bias_residual import check_bias_residual_args
from vitkernels.reference import bias_residual_layernorm as reference

op = dispatch.op("bias_residual_layernorm", "x1 = residual + scale * (y + bias), then LayerNorm(x1)")


def bias_residual_layernorm(
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x1 = residual + scale * (y + bias)`` and its LayerNorm over the last dim.

    Args:
        y: (N, ..., C), e.g. the attention's output Linear without its bias.
        bias: (C,) or None.
        residual: like ``y``.
        weight, ln_bias: (C,) LayerNorm affine parameters, or None.
        eps: LayerNorm epsilon.
        scale: (N,) per-sample drop-path factors, or None.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        ``(x1, LayerNorm(x1) * weight + ln_bias)``, both like ``y``.
    """
    check_bias_residual_args(y, bias, residual, scale)
    check_layernorm_args(y, weight, ln_bias, eps)
    impl = op.select(dispatch.Call(y.device, y.dtype), backend)
    return impl(y, bias, residual, weight, ln_bias, float(eps), scale)


def check_layernorm_args(y: torch.Tensor, weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                         eps: float) -> None:
    """The LayerNorm arguments' checks shared with
    :func:`vitkernels.ops.bias_layernorm_residual.bias_layernorm_residual`: (C,) affine parameters on y's device, a
    non-negative eps."""
    for name, t in (("weight", weight), ("ln_bias", ln_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1)
            check_shape(name, t, (y.shape[-1],), "y.shape[-1]")
            if t.device != y.device:
                raise ValueError(f"{name} must be on y's device {y.device}, got {t.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


@op.register("reference")
def _reference(y, bias, residual, weight, ln_bias, eps, scale):
    return reference.bias_residual_layernorm(y, bias, residual, weight, ln_bias, eps, scale)


if _native.is_loaded():
    _forward = torch.ops.vitkernels.bias_residual_layernorm.default

    def _stats_dtype(y):
        return torch.float64 if y.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("vitkernels::bias_residual_layernorm")
    def _fake(y, bias, residual, scale, weight, ln_bias, eps):
        like = torch.empty_like(y, memory_format=torch.contiguous_format)
        stats = y.new_empty(y.shape[:-1], dtype=_stats_dtype(y))
        return like, torch.empty_like(like), stats, torch.empty_like(stats)

    @torch.library.register_fake("vitkernels::bias_residual_layernorm_")
    def _inplace_fake(y, bias, residual, scale, weight, ln_bias, eps, out):
        return None

    @torch.library.register_fake("vitkernels::bias_residual_layernorm_backward")
    def _backward_fake(grad_x1, grad_out, x1, mean, rstd, weight, scale):
        like = torch.empty_like(x1, memory_format=torch.contiguous_format)
        grad_y = torch.empty_like(like) if scale is not None else x1.new_empty(0)
        param = weight.dtype if weight is not None else x1.dtype
        C = x1.shape[-1]
        return like, grad_y, x1.new_empty(C, dtype=param), x1.new_empty(C, dtype=param), x1.new_empty(C, dtype=param)

    def _setup_context(ctx, inputs, output):
        y, bias, residual, scale, weight, ln_bias, eps = inputs
        x1, out, mean, rstd = output
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, weight, ln_bias))
        ctx.save_for_backward(x1, mean, rstd, weight, scale)
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad_x1, grad_out, grad_mean, grad_rstd):
        x1, mean, rstd, weight, scale = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(x1)
        grad_res, grad_y, grad_bias, grad_weight, grad_ln_bias = torch.ops.vitkernels.bias_residual_layernorm_backward(
            grad_x1, grad_out, x1, mean, rstd, weight, scale
        )
        if scale is None:
            grad_y = grad_res
        need = ctx.needs_input_grad
        bias_dtype, weight_dtype, ln_bias_dtype = ctx.dtypes
        return (
            grad_y,
            grad_bias.to(bias_dtype) if need[1] else None,
            grad_res,
            None,
            grad_weight.to(weight_dtype) if need[4] else None,
            grad_ln_bias.to(ln_bias_dtype) if need[5] else None,
            None,
        )

    torch.library.register_autograd(_forward, _backward, setup_context=_setup_context)
    # second-order gradients would need the backward of the backward kernel: refused clearly, never silent zeros
    refuse_double_backward(torch.ops.vitkernels.bias_residual_layernorm_backward.default, "bias_residual_layernorm",
                           "native")

    # None: a vitkernels._C built before the op existed
    _eager = getattr(torch.ops.vitkernels, "bias_residual_layernorm_eager", None)

    def fused_bias_residual_layernorm(y, bias, residual, scale, weight, ln_bias, eps):
        """``(x1, LayerNorm(x1))``, argument order as the op's, through ``vitkernels::bias_residual_layernorm_eager``
        where :func:`takes_eager_autograd` says, else ``vitkernels::bias_residual_layernorm``: the fused blocks' and
        the native backend's call."""
        if takes_eager_autograd(_eager, y):
            return _eager(y, bias, residual, scale, weight, ln_bias, eps)
        x1, out, _, _ = _forward(y, bias, residual, scale, weight, ln_bias, eps)
        return x1, out

    def _native_supports(call):
        return _native.native_unavailable_reason("bias_residual_layernorm", call.device)

    @op.register("native", _native_supports)
    def _native_impl(y, bias, residual, weight, ln_bias, eps, scale):
        return fused_bias_residual_layernorm(y, bias, residual, scale, weight, ln_bias, eps)

else:
    op.mark_missing("native", _native.IMPORT_ERROR)
