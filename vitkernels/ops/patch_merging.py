"""Op: Swin patch merging's 2x2 gather + LayerNorm(4C), (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C) (see
:mod:`vitkernels.reference.patch_merging`; the reduction Linear follows separately).

Backends: ``reference`` (timm's pad + reshape/permute copy + LayerNorm) and ``native``
(``torch.ops.vitkernels.patch_merging_norm`` from ``csrc/cpu/patch_merging.cpp``, CPU: gathered straight from the
NHWC input into cache-resident rows, one output tensor; its backward recomputes the rows and scatters the gradient).
"""
from __future__ import annotations

from typing import Optional

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import check_shape, check_tensor
from vitkernels.ops._library import refuse_double_backward, takes_eager_autograd
from vitkernels.reference import patch_merging as reference

op = dispatch.op("patch_merging_norm", "Swin patch merging: 2x2 neighbours -> 4C channels, LayerNorm")


def patch_merging_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """LayerNorm over the 4C channels of each 2x2 neighbourhood of ``x``.

    Args:
        x: (B, H, W, C) NHWC tokens; odd H or W is zero-padded.
        weight, bias: (4C,) LayerNorm affine parameters, or None.
        eps: LayerNorm epsilon.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (B, ceil(H/2), ceil(W/2), 4C), neighbours in timm's order (0,0), (1,0), (0,1), (1,1) as (dy, dx).
    """
    check_tensor("x", x, ndim=4)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, ndim=1)
            check_shape(name, t, (4 * x.shape[-1],), "4 * x.shape[-1]")
            if t.device != x.device:
                raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return op.select(dispatch.Call(x.device, x.dtype), backend)(x, weight, bias, float(eps))


@op.register("reference")
def _reference(x, weight, bias, eps):
    return reference.patch_merging_norm(x, weight, bias, eps)


if _native.is_loaded():
    _forward = torch.ops.vitkernels.patch_merging_norm.default

    @torch.library.register_fake("vitkernels::patch_merging_norm")
    def _fake(x, weight, bias, eps):
        B, H, W, C = x.shape
        out = x.new_empty((B, (H + 1) // 2, (W + 1) // 2, 4 * C))
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats = x.new_empty((B, (H + 1) // 2, (W + 1) // 2), dtype=stats_dtype)
        return out, stats, torch.empty_like(stats)

    @torch.library.register_fake("vitkernels::patch_merging_norm_backward")
    def _backward_fake(grad, x, mean, rstd, weight):
        param = weight.dtype if weight is not None else x.dtype
        C4 = 4 * x.shape[-1]
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(C4, dtype=param), \
            x.new_empty(C4, dtype=param)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        out, mean, rstd = output
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad_out, grad_mean, grad_rstd):
        x, mean, rstd, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.vitkernels.patch_merging_norm_backward(
            grad_out, x, mean, rstd, weight
        )
        need = ctx.needs_input_grad
        return (grad_x, grad_weight.to(ctx.dtypes[0]) if need[1] else None,
                grad_bias.to(ctx.dtypes[1]) if need[2] else None, None)

    torch.library.register_autograd(_forward, _backward, setup_context=_setup_context)
    # second-order gradients would need the backward of the backward kernel: refused clearly, never silent zeros
    refuse_double_backward(torch.ops.vitkernels.patch_merging_norm_backward.default, "patch_merging_norm", "native")

    # None: a vitkernels._C built before the op existed
    _eager = getattr(torch.ops.vitkernels, "patch_merging_norm_eager", None)

    def fused_patch_merging_norm(x, weight, bias, eps):
        """The merged, normalised map through ``vitkernels::patch_merging_norm_eager`` where
        :func:`takes_eager_autograd` says, else ``vitkernels::patch_merging_norm``: the fused PatchMerging's and the
        native backend's call."""
        if takes_eager_autograd(_eager, x):
            return _eager(x, weight, bias, eps)
        return _forward(x, weight, bias, eps)[0]

    @op.register("native", lambda call: _native.native_unavailable_reason("patch_merging_norm", call.device))
    def _native_impl(x, weight, bias, eps):
        return fused_patch_merging_norm(x, weight, bias, eps)

else:
    op.mark_missing("native", _native.IMPORT_ERROR)
