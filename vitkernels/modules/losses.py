"""Fast DINO and MSN loss modules on :mod:`vitkernels.ops` (drop-in for the official ``DINOLoss`` and MSN loss).

Same constructors, attributes and buffers as :mod:`vitkernels.reference.dino_loss` / ``msn_loss`` (hence as the
official code); the forward runs the dispatched ops (fused Triton kernels on CUDA, the reference elsewhere; see
:mod:`vitkernels.dispatch`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vitkernels.ops import dino_loss as dino_ops
from vitkernels.ops import msn_loss as msn_ops
from vitkernels.reference import dino_loss as dino_reference
from vitkernels.reference import msn_loss as msn_reference

__all__ = ["DINOLoss", "MSNLoss"]


class DINOLoss(dino_reference.DINOLoss):
    """The official ``DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
    nepochs, student_temp=0.1, center_momentum=0.9)`` on the fused ops: :func:`vitkernels.dino_loss` with the
    epoch's teacher temperature, then :func:`vitkernels.dino_center_update` (a separate fused column reduction + EMA,
    applied after the loss as in the official code).

    The ``center`` buffer (1, out_dim) is updated in place (``copy_``), so it keeps its dtype and identity (the
    official code rebinds the attribute to a new tensor; the values are the same).
    """

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        temp = self.teacher_temp_schedule[epoch]
        loss = dino_ops.dino_loss(student_output, teacher_output, self.center, self.ncrops, self.student_temp, temp)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        self.center.copy_(dino_ops.dino_center_update(self.center, teacher_output.detach(), self.center_momentum))


class MSNLoss(msn_reference.MSNLoss):
    """MSN loss module on :func:`vitkernels.msn_loss`: ``ce + me_max_weight * rloss + ent_weight * sloss``; same
    constructor and defaults as :class:`vitkernels.reference.msn_loss.MSNLoss` (the official ones)."""

    def terms(
        self,
        anchor_views: torch.Tensor,
        target_views: torch.Tensor,
        prototypes: torch.Tensor,
        proto_labels: Optional[torch.Tensor] = None,
        T: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return msn_ops.msn_loss(
            anchor_views, target_views, prototypes, proto_labels, self.num_views, self.tau,
            self.T if T is None else T, self.me_max, self.use_entropy, self.use_sinkhorn,
        )
