"""Triton kernels for Swin V2 (shifted) window attention: scaled cosine attention with a continuous position bias;
semantics in :mod:`vitkernels.reference.window_attention_v2`.

V2 runs V1's kernels (:mod:`vitkernels.triton.window_attention`) with their ``COSINE`` constexpr set: the same
addressing (shift, padding, partition and mask from token coordinates, nothing materialised), the same dense
log2-scaled bias built from the ((2wh-1)(2ww-1), nH) table (V2's table is ``16 * sigmoid`` of the cpb MLP, computed
in PyTorch around the op), the same tiling, launch-configuration table and deterministic reductions. With COSINE
false the branches are compiled out: V1's code is what it was.

Per (window, head), in fp32: ``q^ = q / max(|q|, 1e-12)``, ``k^`` likewise (rows of the head, F.normalize), the dot
operands q^, k^ in the storage dtype (as timm's matmul of F.normalize's output; IEEE fp32 for fp32);
``S = tau_h (q^ k^T) + table[rel(i, j), h] + mask(i, j)``, ``P = softmax(S)``, ``O = P v``; the row log-sum-exp
is kept for the backward.

Backward, recomputing P (delta = rowsum(dO * O)): ``dV = P^T dO``, ``dS = P * (dO V^T - delta)``, the table
gradient from dS as V1; ``G = dS k^``, ``dq = tau (G - q^ (q^ . G)) / |q|`` (``tau G / eps`` where ``|q| < eps``:
F.normalize's clamp) and likewise ``dk`` from ``dS^T q^``; ``d tau_h = sum_i q^_i . G_i``, one partial per dQ
program summed in a fixed order (no atomics: two runs give the same bits).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from vitkernels.triton._launch import Example, LaunchConfig, Target
from vitkernels.triton.window_attention import attention_bwd, attention_fwd
from vitkernels.triton.window_attention import launch_table as _v1_launch_table
from vitkernels.triton.window_attention import supported_reason  # noqa: F401  (V1's kernels, V1's limits)
from vitkernels.triton.window_attention import table_examples as _v1_table_examples


def launch_table(N: int, head_dim: int, dtype: torch.dtype, target: Target) -> Dict[str, LaunchConfig]:
    """V1's table with ``cosine`` (:func:`vitkernels.triton.window_attention.launch_table`): the cosine branches
    add a row normalisation per q / k tile, an fp32 cosine tile per key chunk in the dQ kernel and, in the backward,
    a reload of the rows for F.normalize's backward; the compile gate compiles every configuration with COSINE
    set for sm_80 / sm_90."""
    return _v1_launch_table(N, head_dim, dtype, target, cosine=True)


def table_examples() -> List[Example]:
    """Every configuration :func:`launch_table` returns, each with a tiny problem ``(case, dtype)``, as V1's."""
    return _v1_table_examples("window_attention_v2", cosine=True)


def window_attention_v2_fwd(
    qkv: torch.Tensor,
    table: torch.Tensor,
    scale: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    need_lse: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3C) qkv, ((2wh-1)(2ww-1), nH) table, (nH,) scale -> ((B, H, W, C) out, (B*nW, nH, N) fp32 row
    log-sum-exp, or an empty tensor when ``need_lse`` is False)."""
    return attention_fwd(qkv, table, qkv_bias, window_size, shift_size, num_heads, 1.0, scale, need_lse)


def window_attention_v2_bwd(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    scale: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients (qkv, table, scale, qkv_bias or None) of :func:`window_attention_v2_fwd`, in the inputs'
    dtypes."""
    dqkv, d_table, d_scale, d_qkv_bias = attention_bwd(grad_out, qkv, table, qkv_bias, out, lse, window_size,
                                                       shift_size, num_heads, 1.0, scale)
    return dqkv, d_table, d_scale, d_qkv_bias
