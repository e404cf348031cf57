"""Op: the MSN prototype loss (cross-entropy to sharpened targets, me-max regulariser, optional entropy).

The public function :func:`msn_loss` validates its arguments and dispatches to

* ``reference`` -- :mod:`vitkernels.reference.msn_loss` (the official ``init_msn_loss`` arithmetic),
* ``triton``    -- not written yet,
* ``native``    -- no C++ implementation (not planned).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vitkernels import dispatch
from vitkernels._validation import (
    check_int,
    check_positive_float,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from vitkernels.reference import msn_loss as reference

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
loss_op.mark_missing("triton", "the Triton MSN loss is not written yet")
