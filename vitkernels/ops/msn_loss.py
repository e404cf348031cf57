"""Op: the MSN prototype loss (cross-entropy to sharpened targets, me-max regulariser, optional entropy).

The public function :func:`msn_loss` validates its arguments and dispatches to

* ``reference`` -- :mod:`vitkernels.reference.msn_loss` (the official ``init_msn_loss`` arithmetic),
* ``triton``    -- ``torch.ops.vitkernels.triton_msn_loss`` (+ ``_backward``): the kernels of
  :mod:`vitkernels.triton.msn_loss` (cosine logits of anchors and targets in one GEMM with the L2 norms folded in,
  sharpened targets, per-anchor log-sum-exp / cross-entropy / entropy and the me-max column means in one more
  pass; the backward's dL/dlogits and two GEMMs with the normalisation backward fused), registered with fake
  implementations and autograd so ``torch.compile(fullgraph=True)`` sees no graph break. Identity prototype
  labels only (``proto_labels=None``, what the official training uses); single process (the me-max mean and the
  Sinkhorn sums over ranks need all-reduces inside the loss: multi-process runs use the reference); Sinkhorn itself
  runs as the reference's few PyTorch ops on the (B, K) targets between the kernels,
* ``native``    -- no C++ implementation (not planned).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vitkernels import dispatch, loss_helpers
from vitkernels._validation import (
    check_int,
    check_positive_float,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from vitkernels.reference import msn_loss as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

loss_op = dispatch.op(
    "msn_loss", "MSN cosine-to-prototype softmax, sharpened targets, cross-entropy + me-max (+ entropy)"
)

HALF_DTYPES = (torch.float16, torch.bfloat16)


def msn_loss(
    anchor_views: torch.Tensor,
    target_views: torch.Tensor,
    prototypes: torch.Tensor,
    proto_labels: Optional[torch.Tensor] = None,
    num_views: int = 1,
    tau: float = 0.1,
    T: float = 0.25,
    me_max: bool = True,
    use_entropy: bool = False,
    use_sinkhorn: bool = False,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSN loss terms (Assran et al. 2022, official ``init_msn_loss(...)`` loss function).

    Args:
        anchor_views: (num_views * B, D) anchor representations, view-major (row i pairs with target row i % B).
        target_views: (B, D) target representations; no gradient flows into them.
        prototypes: (K, D).
        proto_labels: (K, C) prototype labels, or None for the identity (C = K; what the official script uses).
        num_views: anchor views per target, >= 1.
        tau: cosine temperature (> 0), T: target sharpening temperature (> 0).
        me_max, use_entropy, use_sinkhorn: as the official flags.
        backend: ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``; see :mod:`vitkernels.dispatch`.

    Returns:
        ``(ce, rloss, sloss)``, scalars: the cross-entropy to the sharpened targets, the me-max term
        ``log C - H(mean probs)`` (0 when ``me_max`` is False) and the mean anchor entropy (0 when ``use_entropy``
        is False); see :func:`vitkernels.reference.msn_loss.msn_loss`. The official step minimises
        ``ce + memax_weight * rloss + ent_weight * sloss``. Float32 for float16 / bfloat16 inputs (the official
        script casts the representations to float32 before the loss), else the input dtype.
    """
    details = _check_args(anchor_views, target_views, prototypes, proto_labels, num_views, tau, T, me_max,
                          use_entropy, use_sinkhorn)
    impl = loss_op.select(dispatch.Call(anchor_views.device, anchor_views.dtype, details), backend)
    return impl(anchor_views, target_views, prototypes, proto_labels, num_views, float(tau), float(T), me_max,
                use_entropy, use_sinkhorn)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_args(anchors, targets, prototypes, proto_labels, num_views, tau, T, me_max, use_entropy, use_sinkhorn):
    check_tensor("anchor_views", anchors, ndim=2)
    check_tensor("target_views", targets, ndim=2)
    check_tensor("prototypes", prototypes, ndim=2)
    check_int("num_views", num_views, minimum=1)
    check_positive_float("tau", tau)
    check_positive_float("T", T)
    _check_bool("me_max", me_max)
    _check_bool("use_entropy", use_entropy)
    _check_bool("use_sinkhorn", use_sinkhorn)
    K, D = prototypes.shape
    if K == 0 or D == 0:
        raise ValueError(f"prototypes must have a non-empty shape (K, D), got {tuple(prototypes.shape)}")
    B = targets.shape[0]
    if B == 0:
        raise ValueError(f"target_views must have at least one row, got shape {tuple(targets.shape)}")
    if targets.shape[1] != D:
        raise ValueError(f"target_views must have D = {D} columns (as prototypes), got shape {tuple(targets.shape)}")
    if anchors.shape != (num_views * B, D):
        raise ValueError(
            f"anchor_views must have shape (num_views * B, D) = ({num_views * B}, {D}) for num_views={num_views} "
            f"and target_views of shape {tuple(targets.shape)}, got {tuple(anchors.shape)}"
        )
    if proto_labels is not None:
        check_tensor("proto_labels", proto_labels, ndim=2)
        if proto_labels.shape[0] != K or proto_labels.shape[1] == 0:
            raise ValueError(
                f"proto_labels must have shape (K, C) = ({K}, C >= 1) for {K} prototypes, "
                f"got {tuple(proto_labels.shape)}"
            )
    check_same_dtype(anchor_views=anchors, target_views=targets, prototypes=prototypes, proto_labels=proto_labels)
    check_same_device(anchor_views=anchors, target_views=targets, prototypes=prototypes, proto_labels=proto_labels)
    return {"batch": B, "dim": D, "prototypes": K, "num_views": num_views,
            "proto_labels": proto_labels is not None, "sinkhorn": use_sinkhorn, "me_max": me_max}


# --- reference backend --------------------------------------------------------------------------------------------

@loss_op.register("reference")
def _loss_reference(anchors, targets, prototypes, proto_labels, num_views, tau, T, me_max, use_entropy,
                    use_sinkhorn):
    if anchors.dtype in HALF_DTYPES:
        anchors, targets, prototypes = anchors.float(), targets.float(), prototypes.float()
        proto_labels = None if proto_labels is None else proto_labels.float()
    return reference.msn_loss(anchors, targets, prototypes, proto_labels, num_views, tau, T, me_max, use_entropy,
                              use_sinkhorn)


loss_op.mark_missing("native", "no C++ implementation of msn_loss (the fused loss is a Triton kernel)")


# --- triton backend: vitkernels/triton/msn_loss.py ----------------------------------------------------------------

def _triton_support(call: dispatch.Call) -> Optional[str]:
    details = call.details
    if details.get("proto_labels"):
        return "proto_labels must be None (identity labels) for the fused kernels"
    if (details.get("me_max") or details.get("sinkhorn")) and loss_helpers.multi_process():
        return ("torch.distributed runs several processes: the me-max mean / Sinkhorn sums need all-reduces inside "
                "the loss, which the fused kernels do not do")
    return None


def _loss_fake(anchors, targets, prototypes, num_views, tau, T, me_max, use_entropy, use_sinkhorn):
    N, B, K = anchors.shape[0], targets.shape[0], prototypes.shape[0]
    f32 = dict(dtype=torch.float32)
    return (anchors.new_empty((3,), **f32), anchors.new_empty((N + B, K), **f32), anchors.new_empty((B, K), **f32),
            anchors.new_empty((N + B + K,), **f32), anchors.new_empty((N, 4), **f32), anchors.new_empty((K,), **f32))


def _loss_backward_fake(grad_terms, anchors, prototypes, logits, targets, rnorm, stats, avg, tau, me_max,
                        use_entropy, need_anchors, need_prototypes):
    grad_anchors = anchors.new_empty(anchors.shape) if need_anchors else anchors.new_empty((0,))
    grad_prototypes = prototypes.new_empty(prototypes.shape) if need_prototypes else prototypes.new_empty((0,))
    return grad_anchors, grad_prototypes


def _register_fake_and_autograd(forward, backward) -> None:
    """Fakes for both ops; autograd of ``forward`` through ``backward``: the anchors and the prototypes get
    gradients (the targets are computed under no_grad, as the official code); the outputs other than the terms are
    statistics saved for the backward, not differentiable."""

    def setup_context(ctx, inputs, output):
        anchors, _, prototypes, _, ctx.tau, _, ctx.me_max, ctx.use_entropy, _ = inputs
        _, logits, targets, rnorm, stats, avg = output
        ctx.save_for_backward(anchors, prototypes, logits, targets, rnorm, stats, avg)
        ctx.mark_non_differentiable(logits, targets, rnorm, stats, avg)

    def backward_fn(ctx, grad_terms, *_grads_of_statistics):
        need_anchors, need_prototypes = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_anchors = grad_prototypes = None
        if need_anchors or need_prototypes:
            grad_anchors, grad_prototypes = backward(
                grad_terms, *ctx.saved_tensors, ctx.tau, ctx.me_max, ctx.use_entropy, need_anchors, need_prototypes
            )
        return (grad_anchors if need_anchors else None, None, grad_prototypes if need_prototypes else None,
                None, None, None, None, None, None)

    torch.library.register_fake(forward)(_loss_fake)
    torch.library.register_fake(backward)(_loss_backward_fake)
    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)
    refuse_double_backward(backward, "msn_loss", "triton")


if HAS_TRITON:
    from vitkernels.ops._library import kernel_op, refuse_double_backward
    from vitkernels.triton import msn_loss as triton_kernels

    @kernel_op("vitkernels::triton_msn_loss")
    def triton_msn_loss(
        anchors: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor, num_views: int, tau: float,
        T: float, me_max: bool, use_entropy: bool, use_sinkhorn: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ce, rloss, sloss) as a (3,) fp32 tensor, then the statistics the backward needs: the cosine logits /
        tau (N + B, K), the (balanced) sharpened targets (B, K), the inverse norms (N + B + K,), per-anchor
        (lse, sum of targets, entropy, ce) (N, 4) and the mean anchor probabilities (K,)."""
        N = anchors.shape[0]
        logits, rnorm = triton_kernels.msn_logits(anchors, targets, prototypes, tau)
        sharp = triton_kernels.msn_targets(logits, N, T)
        if use_sinkhorn:
            sharp = loss_helpers.distributed_sinkhorn(sharp, use_dist=False).contiguous()
        terms, stats, avg = triton_kernels.msn_anchor_fwd(logits, sharp, N, me_max, use_entropy)
        return terms, logits, sharp, rnorm, stats, avg

    @kernel_op("vitkernels::triton_msn_loss_backward")
    def triton_msn_loss_backward(
        grad_terms: torch.Tensor, anchors: torch.Tensor, prototypes: torch.Tensor, logits: torch.Tensor,
        targets: torch.Tensor, rnorm: torch.Tensor, stats: torch.Tensor, avg: torch.Tensor, tau: float,
        me_max: bool, use_entropy: bool, need_anchors: bool, need_prototypes: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        grad_anchors, grad_prototypes = triton_kernels.msn_bwd(
            grad_terms, anchors, prototypes, logits, targets, rnorm, stats, avg, tau, me_max, use_entropy,
            need_anchors, need_prototypes,
        )
        # a custom op returns tensors: empty ones stand for "not needed"
        if grad_anchors is None:
            grad_anchors = anchors.new_empty((0,))
        if grad_prototypes is None:
            grad_prototypes = prototypes.new_empty((0,))
        return grad_anchors, grad_prototypes

    _register_fake_and_autograd(triton_msn_loss, triton_msn_loss_backward)

    @loss_op.register(
        "triton",
        lambda call: triton_unavailable_reason(call.device),
        dispatch.dtypes_check(torch.float16, torch.bfloat16, torch.float32),
        _triton_support,
    )
    def _loss_triton(anchors, targets, prototypes, proto_labels, num_views, tau, T, me_max, use_entropy,
                     use_sinkhorn):
        terms = triton_msn_loss(anchors, targets, prototypes, num_views, tau, T, me_max, use_entropy,
                                use_sinkhorn)[0]
        return terms[0], terms[1], terms[2]

else:
    loss_op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))
