"""Triton kernels for MAE random masking, the MAE decoder unshuffle and MSN patch drop (semantics:
:mod:`vitkernels.reference.masking`).

* ``_rank_kernel``: the argsort of MAE's noise without a sort. Every patch's rank in its row is counted by comparing
  its noise with the whole row (``L`` compares per patch, ``L <= a few thousand``), ties broken by patch index and NaN
  last, which is exactly the permutation of a stable ascending ``torch.sort``. The rank *is* ``ids_restore``; the
  kernel also writes ``ids_keep`` (``ids_shuffle[:, :len_keep]``, scattered by rank) and the binary mask.
* ``_gather_rows_kernel``: ``out[n, k] = src[n, idx[n, k]] (+ add[., idx[n, k]])``, zero where the index is out of
  ``[0, S)``. It moves the kept MAE tokens (fusing the positional-embedding add), MSN's kept tokens (one index row
  shared by the batch) and both their backwards: the adjoint of gathering by a partial permutation is gathering by
  its inverse (``ids_restore`` is the inverse of ``ids_keep``), so no scatter-add, no atomics, every output row is
  written exactly once.
* ``_unshuffle_fwd_kernel`` / ``_unshuffle_bwd_kernel``: the MAE decoder input in one pass (CLS row, visible row or
  mask token chosen per output row by ``ids_restore``, decoder pos-embed added), and its adjoint (scatter of the
  visible rows' gradients, per-sample partial sums of the mask-token gradient).

Each gather program moves a (BLOCK_R rows x BLOCK_D channels) tile; the row indices are read once per program.
Values are copied bit for bit unless an embedding is added, which happens in fp32 (fp64 for fp64 tensors) with one
rounding to the output dtype, as PyTorch's own add.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

from vitkernels.triton._launch import (
    GATE_TARGETS,
    Example,
    LaunchConfig,
    Target,
    device_target,
    half_dtype,
    launcher,
)


@triton.jit
def _upcast(v, F64: tl.constexpr):
    if F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _rank_kernel(
    noise_ptr, ids_restore_ptr, ids_keep_ptr, mask_ptr, L, len_keep, n_lblocks,
    F64: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // n_lblocks
    offs_l = (pid % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_l = offs_l < L
    row = noise_ptr + n * L
    v = _upcast(tl.load(row + offs_l, mask=in_l, other=0.0), F64)  # half -> fp32 keeps the order exactly
    v_nan = v != v
    rank = tl.zeros([BLOCK_L], dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < L
        u = _upcast(tl.load(row + offs_j, mask=in_j, other=0.0), F64)
        u_nan = u != u
        # patch j sorts before patch l: smaller noise (NaN is largest), or equal noise and smaller index
        less = (u[None, :] < v[:, None]) | (v_nan[:, None] & ~u_nan[None, :])
        same = (u[None, :] == v[:, None]) | (v_nan[:, None] & u_nan[None, :])
        before = (less | (same & (offs_j[None, :] < offs_l[:, None]))) & in_j[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    rank64 = rank.to(tl.int64)
    tl.store(ids_restore_ptr + n * L + offs_l, rank64, mask=in_l)
    tl.store(ids_keep_ptr + n * len_keep + rank64, offs_l, mask=in_l & (rank64 < len_keep))
    # bool -> float32 -> mask dtype: the interpreter casts bool straight to bf16 wrongly (1 becomes a denormal)
    removed = (rank64 >= len_keep).to(tl.float32)
    tl.store(mask_ptr + n * L + offs_l, removed.to(mask_ptr.dtype.element_ty), mask=in_l)


@triton.jit
def _gather_rows_kernel(
    src_ptr, idx_ptr, add_ptr, out_ptr, n_out_rows, K, S, D, idx_batch_stride, add_batch_stride,
    HAS_ADD: tl.constexpr, F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < n_out_rows
    in_cols = cols < D
    n = rows // K
    k = rows % K
    i = tl.load(idx_ptr + n * idx_batch_stride + k, mask=in_rows, other=-1).to(tl.int64)
    valid = in_rows & (i >= 0) & (i < S)
    i = tl.where(valid, i, 0)  # never form an out-of-bounds address, even masked
    load_mask = valid[:, None] & in_cols[None, :]
    vals = tl.load(src_ptr + ((n * S + i) * D)[:, None] + cols[None, :], mask=load_mask, other=0.0)
    if HAS_ADD:
        extra = tl.load(add_ptr + (n * add_batch_stride + i * D)[:, None] + cols[None, :], mask=load_mask, other=0.0)
        vals = tl.where(load_mask, _upcast(vals, F64) + _upcast(extra, F64), 0.0)
    tl.store(out_ptr + (rows * D)[:, None] + cols[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr, ids_ptr, token_ptr, pe_ptr, out_ptr, n_out_rows, L, keep, D, pe_batch_stride,
    HAS_PE: tl.constexpr, F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_rows = rows < n_out_rows
    in_cols = cols < D
    n = rows // (L + 1)
    t = rows % (L + 1)  # output token: 0 is CLS, 1 + l is patch l
    is_patch = t > 0
    r = tl.load(ids_ptr + n * L + t - 1, mask=in_rows & is_patch, other=0).to(tl.int64)
    from_x = in_rows & ((~is_patch) | ((r >= 0) & (r < keep)))  # CLS, or a visible patch; else the mask token
    src_row = tl.where(from_x & is_patch, 1 + r, 0)
    vals = tl.load(x_ptr + ((n * (keep + 1) + src_row) * D)[:, None] + cols[None, :],
                   mask=from_x[:, None] & in_cols[None, :], other=0.0)
    token = tl.load(token_ptr + cols, mask=in_cols, other=0.0)
    out_dtype = out_ptr.dtype.element_ty  # promoted dtype of (x, mask_token, pos_embed), as torch.cat and + give
    vals = tl.where(from_x[:, None], vals.to(out_dtype), token.to(out_dtype)[None, :])
    store_mask = in_rows[:, None] & in_cols[None, :]
    if HAS_PE:
        pe = tl.load(pe_ptr + (n * pe_batch_stride + t * D)[:, None] + cols[None, :], mask=store_mask, other=0.0)
        vals = _upcast(vals, F64) + _upcast(pe, F64)
    tl.store(out_ptr + (rows * D)[:, None] + cols[None, :], vals.to(out_dtype), mask=store_mask)


@triton.jit
def _unshuffle_bwd_kernel(
    grad_ptr, ids_ptr, grad_x_ptr, token_partial_ptr, L, keep, D,
    F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (sample, channel block): CLS row copied, visible rows scattered back to their slot in x,
    # mask-token rows summed into this sample's partial (reduced over the batch on the host, deterministic)
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_cols = cols < D
    grad_n = grad_ptr + n * (L + 1) * D
    cls = tl.load(grad_n + cols, mask=in_cols, other=0.0)
    tl.store(grad_x_ptr + n * (keep + 1) * D + cols, cls.to(grad_x_ptr.dtype.element_ty), mask=in_cols)
    if F64:
        acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_R):
        offs_l = l0 + tl.arange(0, BLOCK_R)
        in_l = offs_l < L
        r = tl.load(ids_ptr + n * L + offs_l, mask=in_l, other=-1).to(tl.int64)
        tile_mask = in_l[:, None] & in_cols[None, :]
        g = tl.load(grad_n + ((1 + offs_l) * D)[:, None] + cols[None, :], mask=tile_mask, other=0.0)
        visible = in_l & (r >= 0) & (r < keep)
        dst = tl.where(visible, 1 + r, 0)
        tl.store(grad_x_ptr + ((n * (keep + 1) + dst) * D)[:, None] + cols[None, :], g.to(grad_x_ptr.dtype.element_ty),
                 mask=visible[:, None] & in_cols[None, :])
        masked = in_l & ~visible
        acc += tl.sum(tl.where(masked[:, None] & in_cols[None, :], _upcast(g, F64), 0.0), axis=0)
    tl.store(token_partial_ptr + n * D + cols, acc, mask=in_cols)


# --- host launchers ------------------------------------------------------------------------------------------------

def launch_table(L: int, D: int, target: Target) -> Dict[str, LaunchConfig]:
    """Tiles and warps of the masking kernels, by kernel name (the same on every GPU and under the interpreter).

    * ranking: 16 patches per program compared with the row in steps of 128 (64 for L <= 64);
    * row gathers (kept tokens, unshuffle): 4096-element tiles of (4096 / BLOCK_D) rows x BLOCK_D channels, BLOCK_D
      = 256 (64 for D <= 64), 8 warps = 16 values (two 16-byte bf16 vectors) per thread (ptxas: ~124 registers, no
      spills on sm_90);
    * the unshuffle backward: narrow (32 rows x 64 channels) tiles, N * D / 64 programs (2048 for the ViT-L decoder
      at B = 256), each walking its sample's rows with few registers, several CTAs per SM hide latency."""
    block_d = 256 if D > 64 else 64
    rows = LaunchConfig.of(num_warps=8, BLOCK_R=4096 // block_d, BLOCK_D=block_d)
    return {
        "_rank_kernel": LaunchConfig.of(num_warps=4, BLOCK_L=16, BLOCK_J=128 if L > 64 else 64),
        "_gather_rows_kernel": rows,
        "_unshuffle_fwd_kernel": rows,
        "_unshuffle_bwd_kernel": LaunchConfig.of(num_warps=4, BLOCK_R=32, BLOCK_D=64),
    }


def table_examples() -> List[Example]:
    """Every configuration of :func:`launch_table` (L above / below 64, D above / below 64), each with a tiny
    problem: (N, L, D, keep, dtype)."""
    out = []
    for target in GATE_TARGETS:
        for dtype in (torch.float32, half_dtype(target)):
            for N, L, D, keep in ((2, 20, 24, 7), (2, 70, 72, 20)):
                out.append(Example("masking", (N, L, D, keep, dtype), target, launch_table(L, D, target)))
    return out


def _is_f64(*tensors: Optional[torch.Tensor]) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def rank_noise(noise: torch.Tensor, len_keep: int, mask_dtype: torch.dtype):
    """noise (N, L) -> (ids_restore (N, L) int64, ids_keep (N, len_keep) int64, mask (N, L) in ``mask_dtype``)."""
    noise = noise.contiguous()
    N, L = noise.shape
    ids_restore = torch.empty((N, L), device=noise.device, dtype=torch.int64)
    ids_keep = torch.empty((N, len_keep), device=noise.device, dtype=torch.int64)
    mask = torch.empty((N, L), device=noise.device, dtype=mask_dtype)
    if N * L == 0:
        return ids_restore, ids_keep, mask
    cfg = launch_table(L, 1, device_target(noise.device))["_rank_kernel"]
    n_lblocks = triton.cdiv(L, cfg["BLOCK_L"])
    launcher(_rank_kernel)[(N * n_lblocks,)](
        noise, ids_restore, ids_keep, mask, L, len_keep, n_lblocks, F64=noise.dtype == torch.float64,
        **cfg.kwargs(),
    )
    return ids_restore, ids_keep, mask


def gather_rows(
    src: torch.Tensor, idx: torch.Tensor, add: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """out[n, k] = src[n, idx[n, k]] + add[0 or n, idx[n, k]] (0 where idx is out of [0, S)).

    src (N, S, D); idx (N, K) or (K,) shared by the batch, int64; add None or (1 or N, S, D). ``out_dtype``
    defaults to the promoted dtype of (src, add).
    """
    src = src.contiguous()
    idx = idx.contiguous()
    N, S, D = src.shape
    K = idx.shape[-1]
    if out_dtype is None:
        out_dtype = src.dtype if add is None else torch.promote_types(src.dtype, add.dtype)
    out = torch.empty((N, K, D), device=src.device, dtype=out_dtype)
    n_rows = N * K
    if n_rows * D == 0:
        return out
    if add is not None:
        add = add.contiguous()
    cfg = launch_table(S, D, device_target(src.device))["_gather_rows_kernel"]
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
    launcher(_gather_rows_kernel)[grid](
        src, idx, add if add is not None else src, out, n_rows, K, S, D,
        K if idx.dim() == 2 else 0,
        (S * D if add.shape[0] != 1 else 0) if add is not None else 0,
        HAS_ADD=add is not None, F64=_is_f64(src, add, out), **cfg.kwargs(),
    )
    return out


def mae_unshuffle(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor]
) -> torch.Tensor:
    """x (N, 1 + keep, D), ids_restore (N, L) int64, mask_token (D,), pos_embed None or (1 or N, 1 + L, D)
    -> (N, 1 + L, D)."""
    x = x.contiguous()
    ids_restore = ids_restore.contiguous()
    mask_token = mask_token.contiguous()
    N, keep_plus_cls, D = x.shape
    L = ids_restore.shape[1]
    out_dtype = torch.promote_types(x.dtype, mask_token.dtype)
    if pos_embed is not None:
        out_dtype = torch.promote_types(out_dtype, pos_embed.dtype)
    out = torch.empty((N, L + 1, D), device=x.device, dtype=out_dtype)
    n_rows = N * (L + 1)
    if n_rows * D == 0:
        return out
    if pos_embed is not None:
        pos_embed = pos_embed.contiguous()
    cfg = launch_table(L, D, device_target(x.device))["_unshuffle_fwd_kernel"]
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
    launcher(_unshuffle_fwd_kernel)[grid](
        x, ids_restore, mask_token, pos_embed if pos_embed is not None else x, out, n_rows, L, keep_plus_cls - 1, D,
        ((L + 1) * D if pos_embed.shape[0] != 1 else 0) if pos_embed is not None else 0,
        HAS_PE=pos_embed is not None, F64=out_dtype == torch.float64, **cfg.kwargs(),
    )
    return out


def mae_unshuffle_backward(grad: torch.Tensor, ids_restore: torch.Tensor, keep: int, x_dtype: torch.dtype):
    """grad (N, 1 + L, D) -> (grad_x (N, 1 + keep, D) in ``x_dtype``, grad_mask_token (D,) in fp32 / fp64)."""
    grad = grad.contiguous()
    ids_restore = ids_restore.contiguous()
    N, L_plus_cls, D = grad.shape
    L = L_plus_cls - 1
    f64 = grad.dtype == torch.float64
    grad_x = torch.empty((N, keep + 1, D), device=grad.device, dtype=x_dtype)
    partial = torch.empty((N, D), device=grad.device, dtype=torch.float64 if f64 else torch.float32)
    if N * D > 0:
        cfg = launch_table(L, D, device_target(grad.device))["_unshuffle_bwd_kernel"]
        launcher(_unshuffle_bwd_kernel)[(N, triton.cdiv(D, cfg["BLOCK_D"]))](
            grad, ids_restore, grad_x, partial, L, keep, D, F64=f64, **cfg.kwargs(),
        )
    return grad_x, partial.sum(0)
