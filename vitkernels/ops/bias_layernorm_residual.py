"""Op: post-norm residual branch, ``residual + scale * LayerNorm(y + bias)`` (Swin V2's res-post-norm seam; see
:mod:`vitkernels.reference.bias_layernorm_residual`).

Backends: ``reference`` and ``native`` (``torch.ops.vitkernels.bias_layernorm_residual`` from
``csrc/cpu/bias_layernorm_residual.cpp``, CPU: each row read once; an in-place variant for inference). Its backward
(one pass) recomputes ``y + bias`` row by row instead of saving it, and sums the bias and LayerNorm parameter
gradients on the way; the residual's gradient is the output's.
"""
from __future__ import annotations

from typing import Optional

import torch

from vitkernels import _native, dispatch
from vitkernels.ops._library import refuse_double_backward
from vitkernels.ops.bias_residual import check_bias_residual_args
from vitkernels.ops.bias_residual_layernorm import check_layernorm_args
from vitkernels.reference import bias_layernorm_residual as reference

op = dispatch.op("bias_layernorm_residual", "out = residual + scale * LayerNorm(y + bias)")


def bias_layernorm_residual(
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``residual + scale * (LayerNorm(y + bias) * weight + ln_bias)``, the LayerNorm over the last dim.

    Args:
        y: (N, ..., C), e.g. a Linear's product without its bias.
        bias: (C,) or None.
        residual: like ``y``.
        weight, ln_bias: (C,) LayerNorm affine parameters, or None.
        eps: LayerNorm epsilon.
        scale: (N,) per-sample drop-path factors, or None.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (N, ..., C), like ``y``.
    """
    check_bias_residual_args(y, bias, residual, scale)
    check_layernorm_args(y, weight, ln_bias, eps)
    impl = op.select(dispatch.Call(y.device, y.dtype), backend)
    return impl(y, bias, residual, weight, ln_bias, float(eps), scale)


@op.register("reference")
def _reference(y, bias, residual, weight, ln_bias, eps, scale):
    return reference.bias_layernorm_residual(y, bias, residual, weight, ln_bias, eps, scale)


if _native.is_loaded():
    _forward = torch.ops.vitkernels.bias_layernorm_residual.default

    @torch.library.register_fake("vitkernels::bias_layernorm_residual")
    def _fake(y, bias, residual, scale, weight, ln_bias, eps):
        stats = y.new_empty(y.shape[:-1], dtype=torch.float64 if y.dtype == torch.float64 else torch.float32)
        return torch.empty_like(y, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)

    @torch.library.register_fake("vitkernels::bias_layernorm_residual_")
    def _inplace_fake(y, bias, residual, scale, weight, ln_bias, eps):
        return None

    @torch.library.register_fake("vitkernels::bias_layernorm_residual_backward")
    def _backward_fake(grad_out, y, bias, mean, rstd, weight, scale):
        C = y.shape[-1]
        param = weight.dtype if weight is not None else y.dtype
        return (torch.empty_like(y, memory_format=torch.contiguous_format),
                y.new_empty(C, dtype=bias.dtype if bias is not None else y.dtype),
                y.new_empty(C, dtype=param), y.new_empty(C, dtype=param))

    def _setup_context(ctx, inputs, output):
        y, bias, residual, scale, weight, ln_bias, eps = inputs
        out, mean, rstd = output
        ctx.ln_bias_dtype = None if ln_bias is None else ln_bias.dtype
        ctx.save_for_backward(y, bias, mean, rstd, weight, scale)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_out, grad_mean, grad_rstd):
        if grad_out is None:  # the output unused: no gradient reaches any input
            return (None,) * 7
        y, bias, mean, rstd, weight, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_y = grad_bias = grad_weight = grad_ln_bias = None
        if need[0] or need[1] or need[4] or need[5]:
            grad_y, grad_bias, grad_weight, grad_ln_bias = torch.ops.vitkernels.bias_layernorm_residual_backward(
                grad_out, y, bias, mean, rstd, weight, scale
            )
        return (
            grad_y if need[0] else None,
            grad_bias if need[1] else None,
            grad_out if need[2] else None,
            None,
            grad_weight if need[4] else None,
            grad_ln_bias.to(ctx.ln_bias_dtype) if need[5] else None,
            None,
        )

    torch.library.register_autograd(_forward, _backward, setup_context=_setup_context)
    # second-order gradients would need the backward of the backward kernel: refused clearly, never silent zeros
    refuse_double_backward(torch.ops.vitkernels.bias_layernorm_residual_backward.default, "bias_layernorm_residual",
                           "native")

    def _native_supports(call):
        return _native.native_unavailable_reason("bias_layernorm_residual", call.device)

    @op.register("native", _native_supports)
    def _native_impl(y, bias, residual, weight, ln_bias, eps, scale):
        return _forward(y, bias, residual, scale, weight, ln_bias, eps)[0]

else:
    op.mark_missing("native", _native.IMPORT_ERROR)
