"""Op: the MAE masked reconstruction loss (patchify + optional norm-pix + per-patch MSE + masked mean), fused.

The public function :func:`mae_loss` validates its arguments and dispatches to

* ``reference`` -- :mod:`vitkernels.reference.mae_loss` (the official ``forward_loss`` steps),
* ``native``    -- not written yet (the C++ masking kernels are a separate issue),
* ``triton``    -- custom ops ``torch.ops.vitkernels.triton_mae_loss`` / ``triton_mae_loss_backward`` launching the
  kernels of :mod:`vitkernels.triton.mae_loss` (patchify in the load addressing, norm-pix and per-patch MSE in
  registers, masked mean from per-program partials); fake implementations and autograd w.r.t. ``pred`` (calls whose
  ``imgs`` or ``mask`` need a gradient go to the reference instead).
"""
from __future__ import annotations

from typing import Optional

import torch

from vitkernels import dispatch
from vitkernels._validation import check_int, check_same_device, check_shape, check_tensor
from vitkernels.reference import mae_loss as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

mae_loss_op = dispatch.op(
    "mae_loss", "MAE loss: patchify target (+ norm-pix, unbiased var), per-patch MSE, mean over removed patches"
)


def mae_loss(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = False,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """MAE loss: mean over removed patches of the per-patch MSE between ``pred`` and the (normalised) pixels.

    Args:
        imgs: (N, C, H, W) float images, ``H`` and ``W`` positive multiples of ``patch_size`` (non-square allowed).
        pred: (N, L, p * p * C) float predictions, ``L = (H / p) * (W / p)``, features in patchify order
            (row in patch, column in patch, channel); its dtype may differ from ``imgs``'s.
        mask: (N, L) float weights, 1 = removed (loss taken), 0 = kept, as :func:`vitkernels.random_masking` returns.
        patch_size: p, a positive int.
        norm_pix_loss: normalise each target patch by its mean and unbiased variance (eps 1e-6); needs
            ``p * p * C >= 2``.
        backend: ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``.

    Returns:
        Scalar loss in the promoted dtype of (imgs, pred, mask). NaN when ``mask.sum() == 0``, as the official code.
    """
    check_tensor("imgs", imgs, ndim=4)
    check_tensor("pred", pred, ndim=3)
    check_tensor("mask", mask, ndim=2)
    p = check_int("patch_size", patch_size, minimum=1)
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {norm_pix_loss!r}")
    N, C, H, W = imgs.shape
    if H % p != 0 or W % p != 0 or H == 0 or W == 0:
        raise ValueError(
            f"imgs height and width must be positive multiples of patch_size={p}, got shape {tuple(imgs.shape)}"
        )
    L, P = (H // p) * (W // p), p * p * C
    check_shape("pred", pred, (N, L, P), f"(N, (H/p)*(W/p), p*p*C) for imgs {tuple(imgs.shape)} and patch_size {p}")
    check_shape("mask", mask, (N, L), "(N, L) of pred")
    if norm_pix_loss and P < 2:
        raise ValueError(f"norm_pix_loss needs at least 2 values per patch for the unbiased variance, got p*p*C = {P}")
    check_same_device(imgs=imgs, pred=pred, mask=mask)
    call = dispatch.Call(
        pred.device,
        pred.dtype,
        {"grad_imgs": imgs.requires_grad, "grad_mask": mask.requires_grad, "patch_numel": P},
    )
    impl = mae_loss_op.select(call, backend)
    return impl(imgs, pred, mask, p, norm_pix_loss)


@mae_loss_op.register("reference")
def _mae_loss_reference(imgs, pred, mask, patch_size, norm_pix_loss):
    return reference.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss)


mae_loss_op.mark_missing("native", "no C++ kernel for mae_loss yet (a separate issue)")


# --- triton backend: vitkernels/triton/mae_loss.py ----------------------------------------------------------------

def _triton_grad_check(call: dispatch.Call) -> Optional[str]:
    if call.details.get("grad_imgs") or call.details.get("grad_mask"):
        return "the Triton mae_loss differentiates w.r.t. pred only, but imgs or mask requires grad"
    return None


if HAS_TRITON:
    from vitkernels.ops._library import kernel_op, refuse_double_backward
    from vitkernels.triton import mae_loss as triton_kernels

    def _triton_patch_check(call: dispatch.Call) -> Optional[str]:
        P = call.details.get("patch_numel", 0)
        if P > triton_kernels.MAX_PATCH_NUMEL:
            return f"p * p * C = {P} exceeds the {triton_kernels.MAX_PATCH_NUMEL} values a patch tile holds"
        return None

    @kernel_op("vitkernels::triton_mae_loss")
    def triton_mae_loss(
        imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
    ) -> torch.Tensor:
        """Scalar MAE loss in the promoted dtype of (imgs, pred, mask)."""
        return triton_kernels.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss)

    @triton_mae_loss.register_fake
    def _(imgs, pred, mask, patch_size, norm_pix_loss):
        dtype = torch.promote_types(torch.promote_types(imgs.dtype, pred.dtype), mask.dtype)
        return pred.new_empty((), dtype=dtype)

    @kernel_op("vitkernels::triton_mae_loss_backward")
    def triton_mae_loss_backward(
        grad: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
        norm_pix_loss: bool,
    ) -> torch.Tensor:
        """d loss / d pred (N, L, P) in pred's dtype."""
        return triton_kernels.mae_loss_backward(grad, imgs, pred, mask, patch_size, norm_pix_loss)

    @triton_mae_loss_backward.register_fake
    def _(grad, imgs, pred, mask, patch_size, norm_pix_loss):
        return torch.empty_like(pred)

    def _loss_setup(ctx, inputs, output):
        imgs, pred, mask, ctx.patch_size, ctx.norm_pix_loss = inputs
        ctx.save_for_backward(imgs, pred, mask)

    def _loss_backward(ctx, grad):
        imgs, pred, mask = ctx.saved_tensors
        grad_pred = triton_mae_loss_backward(grad, imgs, pred, mask, ctx.patch_size, ctx.norm_pix_loss)
        return None, grad_pred, None, None, None

    torch.library.register_autograd(triton_mae_loss, _loss_backward, setup_context=_loss_setup)
    refuse_double_backward(triton_mae_loss_backward, "mae_loss", "triton")

    @mae_loss_op.register("triton", lambda call: triton_unavailable_reason(call.device), _triton_grad_check,
                          _triton_patch_check)
    def _mae_loss_triton(imgs, pred, mask, patch_size, norm_pix_loss):
        return triton_mae_loss(imgs, pred, mask, patch_size, norm_pix_loss)

else:
    mae_loss_op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))
