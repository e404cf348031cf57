"""Small pieces of the DINO and MSN losses that the reference (the specification) and the fast paths both use.

Kept out of ``vitkernels.reference`` so that the fast paths import no part of the oracle they are tested against.
"""
from __future__ import annotations

import torch


def num_pairs(ncrops: int) -> int:
    """DINO: number of (teacher view, student view) pairs the loss averages over: pairs ``(t, v)``, ``t < 2``,
    ``v != t``."""
    return sum(1 for t in range(2) for v in range(ncrops) if v != t)


def multi_process() -> bool:
    """Whether ``torch.distributed`` runs with more than one process (the official MSN ``_got_dist`` test)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


@torch.no_grad()
def distributed_sinkhorn(Q: torch.Tensor, num_itr: int = 3, use_dist: bool = True) -> torch.Tensor:
    """MSN: Sinkhorn-Knopp balancing of (B, K) assignments, as the official ``distributed_sinkhorn`` (3 iterations).

    Returns a new (B, K) tensor whose rows sum to 1 and whose prototype columns each carry ``B / K`` of the total
    mass after the last row step (summed over ranks when ``torch.distributed`` runs with more than one process).
    """
    use_dist = use_dist and multi_process()
    world_size = torch.distributed.get_world_size() if use_dist else 1
    Q = Q.T.clone()
    B = Q.shape[1] * world_size  # samples to assign
    K = Q.shape[0]  # prototypes
    sum_Q = torch.sum(Q)
    if use_dist:
        torch.distributed.all_reduce(sum_Q)
    Q /= sum_Q
    for _ in range(num_itr):
        # each prototype (row of Q) gets total weight 1/K
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        if use_dist:
            torch.distributed.all_reduce(sum_of_rows)
        Q /= sum_of_rows
        Q /= K
        # each sample (column of Q) gets total weight 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B  # columns sum to 1: Q is an assignment
    return Q.T

