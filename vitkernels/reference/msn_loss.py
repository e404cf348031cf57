"""MSN prototype loss: the reference (specification) in plain PyTorch.

Assran et al., "Masked Siamese Networks for Label-Efficient Learning", ECCV 2022; follows ``init_msn_loss`` /
``loss`` and ``distributed_sinkhorn`` of the official code (facebookresearch/msn, ``src/losses.py``) and the way
``src/msn_train.py`` combines the terms.

Shapes: N = num_views * B anchor rows (the masked views, view-major: row ``i`` is anchored to target row ``i % B``),
B target rows (the unmasked view through the target encoder), K prototypes of dimension D:

* ``anchor_views``: (num_views * B, D), ``target_views``: (B, D), ``prototypes``: (K, D),
* ``proto_labels``: (K, C) soft labels of the prototypes, or None for the identity (C = K): the official training
  script passes ``one_hot(range(K))`` with label smoothing 0, i.e. the identity.

Math (``normalize`` = L2 normalisation of rows, as ``torch.nn.functional.normalize``)::

    snn(x)   = softmax(normalize(x) @ normalize(prototypes).T / tau) @ proto_labels          (soft nearest neighbours)
    probs    = snn(anchor_views)                                                              (N, C)
    targets  = sharpen(snn(target_views), T) = p ** (1/T) / sum(p ** (1/T))  (no gradient; optional Sinkhorn),
               repeated num_views times                                                       (N, C)
    ce       = mean_i sum_c -targets[i, c] * log(probs[i, c])        (a term is 0 where the target is 0)
    rloss    = sum_c avg[c] * log(avg[c]) + log(C) = log C - H(avg),  avg = mean_i probs[i]    (me-max; 0 if off)
    sloss    = mean_i sum_c -probs[i, c] * log(probs[i, c])          (mean anchor entropy; 0 if off)

The official training step minimises ``ce + memax_weight * rloss + ent_weight * sloss``.

Numerics: the official code writes ``log(probs ** -targets)``; here the same quantity is ``-targets * log_probs`` with
``log_probs = log_softmax(...)`` when ``proto_labels`` is None (equal to ``log(softmax(...))``, but finite where the
softmax underflows to 0), and ``log(max(probs, tiny))`` otherwise; likewise ``avg * log(max(avg, tiny))`` in me-max.
These agree with the official expressions wherever those are finite, and stay finite (with finite gradients) where
the official ones would give inf or NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels.loss_helpers import distributed_sinkhorn, multi_process

__all__ = ["MSNLoss", "distributed_sinkhorn", "msn_loss", "multi_process", "sharpen", "snn_log_probs"]


def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).tiny


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """Target sharpening: ``p ** (1 / T)`` renormalised over the last dimension."""
    sharp_p = p ** (1.0 / T)
    return sharp_p / torch.sum(sharp_p, dim=1, keepdim=True)


def snn_log_probs(
    query: torch.Tensor, supports: torch.Tensor, support_labels: Optional[torch.Tensor], tau: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-nearest-neighbour classifier: ``(probs, log_probs)`` of ``softmax(cos(query, supports) / tau) @ labels``.

    ``support_labels=None`` means the identity (probs over the supports themselves).
    """
    query = F.normalize(query)
    supports = F.normalize(supports)
    logits = query @ supports.T / tau
    if support_labels is None:
        log_probs = F.log_softmax(logits, dim=1)
        return log_probs.exp(), log_probs
    probs = F.softmax(logits, dim=1) @ support_labels
    return probs, torch.log(probs.clamp_min(_tiny(probs)))


class _AllReduceMean(torch.autograd.Function):
    """Mean over ranks in the forward, identity in the backward (the official ``AllReduce``)."""

    @staticmethod
    def forward(ctx, x):
        if multi_process():
            x = x.contiguous() / torch.distributed.get_world_size()
            torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three terms of the MSN loss, as the official ``loss(...)`` of ``init_msn_loss``.

    Args:
        anchor_views: (num_views * B, D) anchor (masked view) representations.
        target_views: (B, D) target representations (no gradient flows into them: the targets are computed under
            ``torch.no_grad``).
        prototypes: (K, D) learnable prototypes.
        proto_labels: (K, C) prototype labels, or None for the identity.
        num_views: anchor views per target (``focal_views + rand_views`` in the official script).
        tau: cosine-similarity temperature (official 0.1).
        T: target sharpening temperature (official 0.25).
        me_max: compute the mean-entropy-maximisation regulariser.
        use_entropy: compute the mean anchor entropy.
        use_sinkhorn: balance the targets with :func:`distributed_sinkhorn`.

    Returns:
        ``(ce, rloss, sloss)``: the cross-entropy H(targets, probs) averaged over anchors, the me-max term
        ``log C - H(mean probs)`` (zero tensor when ``me_max`` is False) and the mean anchor entropy (zero tensor when
        ``use_entropy`` is False), all scalars. The official step minimises ``ce + memax_weight * rloss +
        ent_weight * sloss``. (The official function also returns logging statistics; they are left out here.)
    """
    # Step 1: anchor predictions.
    probs, log_probs = snn_log_probs(anchor_views, prototypes, proto_labels, tau)

    # Step 2: sharpened targets, no gradient.
    with torch.no_grad():
        target_probs, _ = snn_log_probs(target_views, prototypes, proto_labels, tau)
        targets = sharpen(target_probs, T)
        if use_sinkhorn:
            targets = distributed_sinkhorn(targets)
        targets = torch.cat([targets for _ in range(num_views)], dim=0)

    # Step 3: cross-entropy H(targets, probs); terms with a zero target are exactly 0.
    ce = torch.mean(torch.sum(-targets * log_probs, dim=1))

    # Step 4: me-max regulariser log C - H(avg_probs), avg over all anchors (and ranks).
    zero = ce.new_zeros(())
    rloss = zero
    if me_max:
        avg_probs = _AllReduceMean.apply(torch.mean(probs, dim=0))
        rloss = torch.sum(avg_probs * torch.log(avg_probs.clamp_min(_tiny(avg_probs)))) + math.log(
            float(len(avg_probs))
        )

    sloss = zero
    if use_entropy:
        sloss = torch.mean(torch.sum(-probs * log_probs, dim=1))
    return ce, rloss, sloss


class MSNLoss(nn.Module):
    """MSN loss as a module: ``ce + me_max_weight * rloss + ent_weight * sloss`` (a scalar).

    Constructor defaults are the official ones: ``init_msn_loss(num_views=1, tau=0.1, me_max=True)`` and the
    loss call's ``T=0.25, use_entropy=False, use_sinkhorn=False``. The weights are named after ``src/msn_train.py``'s
    ``criterion.memax_weight`` / ``criterion.ent_weight``: ``me_max_weight=1.0`` (the script's fallback and the
    released configs' value) and ``ent_weight=0.0`` (the released ``msn_vits16.yaml``; the script falls back to 1.0
    when the key is absent, which only matters with ``use_entropy=True``). Note the released ViT configs turn
    ``use_sinkhorn`` (and ``use_ent``, at weight 0) on; the code defaults kept here have them off. The sharpening
    temperature of a step can be overridden in :meth:`forward` (the official script anneals it per iteration from
    ``start_sharpen`` to ``final_sharpen``, both 0.25 in the released configs).

    The module has no parameters or buffers: the prototypes (and their labels) are the caller's, as in the
    official code, and are passed to :meth:`forward`.
    """

    def __init__(
        self,
        num_views: int = 1,
        tau: float = 0.1,
        T: float = 0.25,
        me_max: bool = True,
        use_sinkhorn: bool = False,
        use_entropy: bool = False,
        me_max_weight: float = 1.0,
        ent_weight: float = 0.0,
    ):
        super().__init__()
        self.num_views = num_views
        self.tau = tau
        self.T = T
        self.me_max = me_max
        self.use_sinkhorn = use_sinkhorn
        self.use_entropy = use_entropy
        self.me_max_weight = me_max_weight
        self.ent_weight = ent_weight

    def terms(
        self,
        anchor_views: torch.Tensor,
        target_views: torch.Tensor,
        prototypes: torch.Tensor,
        proto_labels: Optional[torch.Tensor] = None,
        T: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ce, rloss, sloss)`` of :func:`msn_loss` with this module's settings."""
        return msn_loss(
            anchor_views, target_views, prototypes, proto_labels, self.num_views, self.tau,
            self.T if T is None else T, self.me_max, self.use_entropy, self.use_sinkhorn,
        )

    def forward(
        self,
        anchor_views: torch.Tensor,
        target_views: torch.Tensor,
        prototypes: torch.Tensor,
        proto_labels: Optional[torch.Tensor] = None,
        T: Optional[float] = None,
    ) -> torch.Tensor:
        ce, rloss, sloss = self.terms(anchor_views, target_views, prototypes, proto_labels, T)
        return ce + self.me_max_weight * rloss + self.ent_weight * sloss

    def extra_repr(self) -> str:
        return (
            f"num_views={self.num_views}, tau={self.tau}, T={self.T}, me_max={self.me_max}, "
            f"use_sinkhorn={self.use_sinkhorn}, use_entropy={self.use_entropy}, "
            f"me_max_weight={self.me_max_weight}, ent_weight={self.ent_weight}"
        )
