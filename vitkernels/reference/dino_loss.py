"""DINO multi-crop self-distillation loss: the reference (specification) in plain PyTorch.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021; follows ``DINOLoss`` of the
official code (facebookresearch/dino, ``main_dino.py``) step by step.

Shapes: the student sees ``ncrops`` views of a batch of B images (2 global crops first, then the local crops), the
teacher only the 2 global views; rows are view-major, as the official data loader stacks them:

* ``student_output``: (ncrops * B, K) logits, row ``v * B + b`` = view v of image b,
* ``teacher_output``: (2 * B, K) logits, row ``t * B + b`` = global view t of image b,
* ``center``: (1, K) (or (K,)), the running mean of the teacher logits.

Math, with ``s_v = student_v / student_temp`` and ``q_t = softmax((teacher_t - center) / teacher_temp)``
(no gradient through the teacher)::

    loss = 1 / n_pairs * sum_{t in {0, 1}} sum_{v != t} mean_b sum_k -q_t[b, k] * log_softmax(s_v)[b, k]

where ``n_pairs`` counts the (t, v) pairs with ``v != t`` (``2 * ncrops - 2`` for ``ncrops >= 2``): a teacher view is
never compared with the student's view of the same crop. After the loss, the centre moves towards the batch mean of
the teacher logits: ``center <- m * center + (1 - m) * mean(teacher_output, 0)``, the mean taken over all ranks when
``torch.distributed`` is initialised.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels.loss_helpers import num_pairs

__all__ = ["DINOLoss", "dino_center_update", "dino_loss", "num_pairs", "teacher_temp_schedule", "world_size"]


def dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    ncrops: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """DINO cross-entropy between the centred, sharpened teacher and the student over all cross-view pairs.

    Args:
        student_output: (ncrops * B, K) student logits, view-major.
        teacher_output: (2 * B, K) teacher logits of the 2 global views, view-major. Detached (no gradient).
        center: (1, K) or (K,) centre subtracted from the teacher logits.
        ncrops: number of student views (2 global + local crops).
        student_temp: student softmax temperature (official default 0.1).
        teacher_temp: teacher softmax temperature (the official module takes it from its warm-up schedule).

    Returns:
        The scalar loss, in the promoted dtype of the inputs.
    """
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # the teacher's and the student's view of the same global crop are not compared
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss = total_loss + loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def world_size() -> int:
    """Number of processes of the initialised ``torch.distributed`` group, 1 without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@torch.no_grad()
def dino_center_update(center: torch.Tensor, teacher_output: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """The centre's EMA step: ``momentum * center + (1 - momentum) * batch_center``; returns the new centre.

    ``batch_center`` is the mean of the (2 * B, K) teacher logits over rows, summed over all ranks (all-reduce) and
    divided by ``len(teacher_output) * world_size`` when ``torch.distributed`` is initialised, as the official
    ``update_center``. The result has the shape of ``center``; the inputs are not modified.
    """
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
    ranks = world_size()
    if ranks > 1:
        torch.distributed.all_reduce(batch_center)
    batch_center = batch_center / (len(teacher_output) * ranks)
    new_center = center * momentum + batch_center.reshape(center.shape) * (1 - momentum)
    return new_center


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> List[float]:
    """Per-epoch teacher temperature: a linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs (both ends included), then constant, for ``nepochs`` epochs in all.

    The same numbers as the official ``np.concatenate((np.linspace(...), np.ones(...) * teacher_temp))`` (numpy's
    linspace is ``start + i * step`` with the last point set to ``stop``), without numpy.
    """
    if warmup_teacher_temp_epochs < 0 or nepochs < warmup_teacher_temp_epochs:
        raise ValueError(
            f"need 0 <= warmup_teacher_temp_epochs <= nepochs, got {warmup_teacher_temp_epochs} and {nepochs}"
        )
    n = warmup_teacher_temp_epochs
    warmup: List[float] = []
    if n == 1:
        warmup = [float(warmup_teacher_temp)]
    elif n > 1:
        step = (teacher_temp - warmup_teacher_temp) / (n - 1)
        warmup = [i * step + warmup_teacher_temp for i in range(n - 1)] + [float(teacher_temp)]
    return warmup + [float(teacher_temp)] * (nepochs - n)


class DINOLoss(nn.Module):
    """The official ``DINOLoss`` module: loss with the epoch's teacher temperature, then the centre's EMA update.

    Args:
        out_dim: K, the number of prototypes (output dimension of the DINO head).
        ncrops: number of student views (2 global + local crops).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs: the teacher temperature schedule
            (see :func:`teacher_temp_schedule`; official defaults 0.04, 0.04, 0, 100 in ``main_dino.py``).
        student_temp: 0.1 as the official code.
        center_momentum: 0.9 as the official code.

    Buffers: ``center`` (1, out_dim), zeros at construction (state-dict key ``center``, as the official module).
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # The teacher temperature is warmed up because a too high temperature makes early training unstable.
        self.teacher_temp_schedule: Sequence[float] = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Loss of this step (teacher temperature of ``epoch``), then ``center`` moves by one EMA step."""
        temp = self.teacher_temp_schedule[epoch]
        loss = dino_loss(student_output, teacher_output, self.center, self.ncrops, self.student_temp, temp)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        self.center = dino_center_update(self.center, teacher_output, self.center_momentum)
