"""Triton kernels for the fused DINO loss and its centre update (semantics: :mod:`vitkernels.reference.dino_loss`).

With ``s_v = student_v / tau_s`` (view v = 0..V-1 of B rows), ``p_t = softmax((teacher_t - c) / tau_t)`` (global
view t = 0, 1), ``w_v = #{t < 2 : t != v}`` and ``Q_v = sum_{t < 2, t != v} p_t``, the official sum over the
``n_pairs = sum_v w_v`` (teacher view, student view) pairs collapses to per-row terms::

    loss = 1 / (n_pairs * B) * sum_{v, b} [ w_v * lse(s_v[b]) - <Q_v[b], s_v[b]> ]            (sum_k p_t = 1)
    d loss / d student_v[b] = g / (n_pairs * B * tau_s) * (w_v * softmax(s_v[b]) - Q_v[b])

so one read of the student and of the teacher (after a statistics pass over the teacher) give the loss, and one
more of each the gradient; each teacher softmax is computed once per pass, for all student views; nothing of size
(pairs x B x K) exists. The class dimension K (up to 65,536 and beyond) is split into chunks of ``CHUNK``
classes, each program owning one (image b, chunk) and looping over it in ``BLOCK_K`` tiles; per-chunk partial
(max, sum of exp, dot) triples are merged after (two-pass log-sum-exp: no atomics, deterministic).

Kernels:

* ``_dino_teacher_stats_kernel``  grid (2B, n_chunks): partial max / sum-exp of (teacher - c) / tau_t per chunk;
* ``_dino_fwd_kernel``            grid (B, n_chunks): merges the teacher partials of rows b and B + b into their
  log-sum-exps, then walks the chunk once: each teacher tile becomes probabilities once, and all student views
  of image b (a (views, BLOCK_K) tile) fold it into their online (max, sum-exp) of s_v and <Q_v, s_v>;
* ``_dino_finalize_kernel``       grid (1,): merges the student partials into each row's log-sum-exp (kept for the
  backward, online over tiles of chunk partials) and reduces the loss;
* ``_dino_bwd_kernel``            grid (B, n_chunks): the student gradient, tile by tile;
* ``_dino_center_kernel``         grid (K / BLOCK_K,): column sums of the teacher logits and the EMA, one pass.

Running maxima / sums are kept per lane (vectors of BLOCK_K) and reduced once per chunk, so the inner loops are
elementwise; all math is fp32 whatever the input dtype.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkernels.loss_helpers import num_pairs
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
def _merge_lse(m_ptr, l_ptr, row, NSPLIT, NSPLIT_P2: tl.constexpr):
    """log-sum-exp of a row from its per-chunk partials (max m_j, sum exp(x - m_j) l_j)."""
    js = tl.arange(0, NSPLIT_P2)
    jmask = js < NSPLIT
    m = tl.load(m_ptr + row * NSPLIT + js, mask=jmask, other=float("-inf"))
    l = tl.load(l_ptr + row * NSPLIT + js, mask=jmask, other=0.0)
    top = tl.max(m, axis=0)
    return top + tl.log(tl.sum(l * tl.exp(m - top), axis=0))


@triton.jit
def _online_lse_step(m_vec, l_vec, x):
    """Per-lane online log-sum-exp: fold ``x`` (-inf where masked) into running maxima and sums of exp."""
    m_new = tl.maximum(m_vec, x)
    # lanes that have seen only -inf keep (-inf, 0): shift by 0 there instead of computing -inf - -inf
    shift = tl.where(m_new > float("-inf"), m_new, 0.0)
    return m_new, l_vec * tl.exp(m_vec - shift) + tl.exp(x - shift)


@triton.jit
def _teacher_probs(t_row_ptr, c, offs, mask, lse, inv_tt):
    """softmax((teacher_row - c) / tau_t) at classes ``offs`` (0 where masked), from the row's log-sum-exp."""
    t = tl.load(t_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.exp(tl.where(mask, (t - c) * inv_tt - lse, float("-inf")))


@triton.jit
def _teacher_tile(t_ptr, c_ptr, b, B, K, offs, mask, lse0, lse1, inv_tt):
    """Image b's two global-view teacher distributions at classes ``offs``: (p_0, p_1), read once per tile."""
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p0 = _teacher_probs(t_ptr + b * K, c, offs, mask, lse0, inv_tt)
    p1 = _teacher_probs(t_ptr + (B + b) * K, c, offs, mask, lse1, inv_tt)
    return p0, p1


@triton.jit
def _dino_teacher_stats_kernel(
    t_ptr, c_ptr, c_copy_ptr, pm_ptr, pl_ptr, K, NSPLIT, inv_tt,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    inv_tt = tl.cast(inv_tt, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_K)
    m_vec = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    l_vec = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, CHUNK, BLOCK_K):
        offs = split * CHUNK + k0 + lanes
        mask = offs < K
        t = tl.load(t_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # the backward's copy of the centre (the caller updates its centre in place right after the loss)
        if row == 0:
            tl.store(c_copy_ptr + offs, c, mask=mask)
        x = tl.where(mask, (t - c) * inv_tt, float("-inf"))
        m_vec, l_vec = _online_lse_step(m_vec, l_vec, x)
    top = tl.max(m_vec, axis=0)
    tl.store(pm_ptr + row * NSPLIT + split, top)
    tl.store(pl_ptr + row * NSPLIT + split, tl.sum(l_vec * tl.exp(m_vec - top), axis=0))


@triton.jit
def _dino_fwd_kernel(
    s_ptr, t_ptr, c_ptr, tpm_ptr, tpl_ptr, tlse_ptr, pm_ptr, pl_ptr, pd_ptr,
    B, K, NSPLIT, NCROPS, inv_ts, inv_tt,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, NSPLIT_P2: tl.constexpr, VIEWS_P2: tl.constexpr,
):
    inv_ts = tl.cast(inv_ts, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    inv_tt = tl.cast(inv_tt, tl.float32)
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lse0 = _merge_lse(tpm_ptr, tpl_ptr, b, NSPLIT, NSPLIT_P2)
    lse1 = _merge_lse(tpm_ptr, tpl_ptr, B + b, NSPLIT, NSPLIT_P2)
    first = split == 0
    tl.store(tlse_ptr + b, lse0, mask=first)
    tl.store(tlse_ptr + B + b, lse1, mask=first)
    lanes = tl.arange(0, BLOCK_K)
    views = tl.arange(0, VIEWS_P2)
    vmask = views < NCROPS
    rows = views.to(tl.int64) * B + b  # student row of each view of image b
    # every student view of image b at once: running (max, sum-exp) of s_v and <Q_v, s_v> per (view, lane)
    m = tl.full((VIEWS_P2, BLOCK_K), float("-inf"), tl.float32)
    l = tl.zeros((VIEWS_P2, BLOCK_K), tl.float32)
    d = tl.zeros((VIEWS_P2, BLOCK_K), tl.float32)
    not_view0 = (views != 0)[:, None]
    not_view1 = (views != 1)[:, None]
    for k0 in range(0, CHUNK, BLOCK_K):
        offs = split * CHUNK + k0 + lanes
        mask = offs < K
        # the teacher tile: read and turned into probabilities once, for all student views
        p0, p1 = _teacher_tile(t_ptr, c_ptr, b, B, K, offs, mask, lse0, lse1, inv_tt)
        # Q_v: the teacher distributions of the global views other than v (view v itself is skipped)
        q = tl.where(not_view0, p0[None, :], 0.0) + tl.where(not_view1, p1[None, :], 0.0)
        smask = vmask[:, None] & mask[None, :]
        s = tl.load(s_ptr + rows[:, None] * K + offs[None, :], mask=smask, other=0.0).to(tl.float32) * inv_ts
        d += q * s
        m, l = _online_lse_step(m, l, tl.where(smask, s, float("-inf")))
    top = tl.max(m, axis=1)
    top_safe = tl.where(vmask, top, 0.0)  # padding views (v >= NCROPS) saw only -inf: no -inf - -inf
    tl.store(pm_ptr + rows * NSPLIT + split, top, mask=vmask)
    tl.store(pl_ptr + rows * NSPLIT + split, tl.sum(l * tl.exp(m - top_safe[:, None]), axis=1), mask=vmask)
    tl.store(pd_ptr + rows * NSPLIT + split, tl.sum(d, axis=1), mask=vmask)


@triton.jit
def _dino_finalize_kernel(
    pm_ptr, pl_ptr, pd_ptr, lse_ptr, loss_ptr, B, R, NSPLIT, scale,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Rows in blocks of BLOCK_R; each row's NSPLIT (max, sum-exp, dot) partials merged BLOCK_S at a time."""
    scale = tl.cast(scale, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_R,), tl.float32)
        d = tl.zeros((BLOCK_R,), tl.float32)
        for s0 in range(0, NSPLIT, BLOCK_S):
            js = s0 + tl.arange(0, BLOCK_S)
            offs = rows[:, None] * NSPLIT + js[None, :]
            mask = rmask[:, None] & (js < NSPLIT)[None, :]
            pm = tl.load(pm_ptr + offs, mask=mask, other=float("-inf"))
            pl = tl.load(pl_ptr + offs, mask=mask, other=0.0)
            d += tl.sum(tl.load(pd_ptr + offs, mask=mask, other=0.0), axis=1)
            m_new = tl.maximum(m, tl.max(pm, axis=1))
            shift = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows past R saw only -inf
            l = l * tl.exp(m - shift) + tl.sum(pl * tl.exp(pm - shift[:, None]), axis=1)
            m = m_new
        lse = tl.where(rmask, m + tl.log(tl.where(rmask, l, 1.0)), 0.0)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        # w_v teacher views are compared with student view v = row // B: 1 for the two global views, else 2
        w = tl.where(rows // B < 2, 1.0, 2.0)
        acc += tl.where(rmask, w * lse - d, 0.0)
    tl.store(loss_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def _dino_bwd_kernel(
    g_ptr, s_ptr, t_ptr, c_ptr, tlse_ptr, lse_ptr, ds_ptr,
    B, K, NCROPS, inv_ts, inv_tt, scale,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    inv_ts = tl.cast(inv_ts, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    inv_tt = tl.cast(inv_tt, tl.float32)
    scale = tl.cast(scale, tl.float32)
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    g = tl.load(g_ptr).to(tl.float32) * scale * inv_ts
    lse0 = tl.load(tlse_ptr + b)
    lse1 = tl.load(tlse_ptr + B + b)
    lanes = tl.arange(0, BLOCK_K)
    for k0 in range(0, CHUNK, BLOCK_K):
        offs = split * CHUNK + k0 + lanes
        mask = offs < K
        # the teacher tile is read once for all student views of image b
        p0, p1 = _teacher_tile(t_ptr, c_ptr, b, B, K, offs, mask, lse0, lse1, inv_tt)
        for v in range(0, NCROPS):
            row = v * B + b
            lse = tl.load(lse_ptr + row)
            s = tl.load(s_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
            probs = tl.exp(tl.where(mask, s - lse, float("-inf")))
            q = tl.where(v != 0, p0, 0.0) + tl.where(v != 1, p1, 0.0)
            w = tl.where(v < 2, 1.0, 2.0)
            ds = g * (w * probs - q)
            tl.store(ds_ptr + row * K + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dino_center_kernel(
    t_ptr, c_ptr, out_ptr, R, K, momentum, scale,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    momentum = tl.cast(momentum, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    scale = tl.cast(scale, tl.float32)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & cmask[None, :]
        acc += tl.load(t_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    batch_center = tl.sum(acc, axis=0) * scale
    c = tl.load(c_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    new = c * momentum + batch_center * (1.0 - momentum)
    tl.store(out_ptr + cols, new.to(out_ptr.dtype.element_ty), mask=cmask)


# --- host side ----------------------------------------------------------------------------------------------------

def _class_block(K: int) -> int:
    """Class lanes per tile: 1024 from K = 1024 up, else 256 or 64 (masked past K)."""
    return 1024 if K >= 1024 else (256 if K >= 256 else 64)


def chunking(B: int, K: int, block_k: int, chunk: Optional[int] = None) -> Tuple[int, int]:
    """(CHUNK classes per program, NSPLIT chunks per row): about 1024 programs (B x NSPLIT) on a GPU, so that
    2 global + 8 local views of B = 64 images at K = 65,536 use 4096-class chunks."""
    if chunk is None:
        tiles = triton.cdiv(K, block_k)
        nsplit = max(1, min(tiles, triton.cdiv(1024, B)))
        chunk = triton.cdiv(tiles, nsplit) * block_k
    assert chunk % block_k == 0
    return chunk, triton.cdiv(K, chunk)


def launch_table(B: int, K: int, ncrops: int, target: Target, block_k: Optional[int] = None,
                 chunk: Optional[int] = None) -> Dict[str, LaunchConfig]:
    """Tiles and warps of the DINO kernels, by kernel name (the same on every GPU and under the interpreter;
    ``block_k`` / ``chunk`` override the class tiling: tests use tiny ones to exercise the merging).

    Row kernels: BLOCK_K class lanes (1024, 256 or 64 by K) on 4, 2 or 1 warps. The forward holds (views, BLOCK_K)
    state: narrower tiles (a power of two <= BLOCK_K, so they divide the chunk) keep it at <= 4096 fp32 per array,
    on 8 warps when full. The finalize kernel merges (32 rows x 32 chunk partials) tiles; the centre update reads
    (32 rows x 256 classes) tiles."""
    block_k = block_k or _class_block(K)
    warps = 4 if block_k >= 512 else (2 if block_k >= 128 else 1)
    views_p2 = triton.next_power_of_2(ncrops)
    fwd_block = min(block_k, max(16, 4096 // views_p2))
    row = LaunchConfig.of(num_warps=warps, BLOCK_K=block_k)
    return {
        "_dino_teacher_stats_kernel": row,
        "_dino_fwd_kernel": LaunchConfig.of(num_warps=8 if views_p2 * fwd_block >= 4096 else warps,
                                            BLOCK_K=fwd_block),
        "_dino_finalize_kernel": LaunchConfig.of(num_warps=4, BLOCK_R=32, BLOCK_S=32),
        "_dino_bwd_kernel": row,
        "_dino_center_kernel": LaunchConfig.of(num_warps=4, BLOCK_R=32, BLOCK_K=min(256, block_k)),
    }


def table_examples() -> List[Example]:
    """Every configuration of :func:`launch_table` (K below 256, below 1024, above; 2, 4 or 10 crops: the forward's
    tile narrows with the views), each with a tiny problem: (B, K, ncrops, dtype)."""
    out, seen = [], set()
    for target in GATE_TARGETS:
        for dtype in (torch.float32, half_dtype(target)):
            for B, K, ncrops in itertools.product((2,), (100, 300, 1500), (4, 10, 2)):
                table = launch_table(B, K, ncrops, target)
                key = (target.arch, dtype, tuple(sorted(table.items())))
                if key not in seen:
                    seen.add(key)
                    out.append(Example("dino_loss", (B, K, ncrops, dtype), target, table))
    return out


class _Tiling:
    """One call's class tiling and launch configurations."""

    def __init__(self, B: int, K: int, ncrops: int, device: torch.device, block_k: Optional[int] = None,
                 chunk: Optional[int] = None):
        self.table = launch_table(B, K, ncrops, device_target(device), block_k, chunk)
        self.block_k = self.table["_dino_bwd_kernel"]["BLOCK_K"]
        self.chunk, self.nsplit = chunking(B, K, self.block_k, chunk)
        self.nsplit_p2 = triton.next_power_of_2(self.nsplit)

    def kwargs(self, kernel: str) -> dict:
        return self.table[kernel].kwargs()


def dino_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    ncrops: int,
    student_temp: float,
    teacher_temp: float,
    block_k: Optional[int] = None,
    chunk: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar), and for the backward: the student rows' log-sum-exps of s / tau_s (ncrops * B,), the
    teacher rows' log-sum-exps of (t - c) / tau_t (2B,) and an fp32 copy of the centre (K,) (the official module
    moves its centre right after the loss; the gradient needs the one the loss used)."""
    student, teacher, center = student.contiguous(), teacher.contiguous(), center.contiguous()
    R, K = student.shape
    B = R // ncrops
    tiling = _Tiling(B, K, ncrops, student.device, block_k, chunk)
    dev = student.device
    f32 = dict(device=dev, dtype=torch.float32)
    tpm = torch.empty((2 * B, tiling.nsplit), **f32)
    tpl = torch.empty((2 * B, tiling.nsplit), **f32)
    inv_ts, inv_tt = 1.0 / student_temp, 1.0 / teacher_temp
    center_copy = torch.empty((K,), **f32)
    launcher(_dino_teacher_stats_kernel)[(2 * B, tiling.nsplit)](
        teacher, center, center_copy, tpm, tpl, K, tiling.nsplit, inv_tt,
        CHUNK=tiling.chunk, **tiling.kwargs("_dino_teacher_stats_kernel"),
    )
    teacher_lse = torch.empty((2 * B,), **f32)
    pm = torch.empty((R, tiling.nsplit), **f32)
    pl = torch.empty((R, tiling.nsplit), **f32)
    pd = torch.empty((R, tiling.nsplit), **f32)
    launcher(_dino_fwd_kernel)[(B, tiling.nsplit)](
        student, teacher, center, tpm, tpl, teacher_lse, pm, pl, pd,
        B, K, tiling.nsplit, ncrops, inv_ts, inv_tt,
        CHUNK=tiling.chunk, NSPLIT_P2=tiling.nsplit_p2, VIEWS_P2=triton.next_power_of_2(ncrops),
        **tiling.kwargs("_dino_fwd_kernel"),
    )
    student_lse = torch.empty((R,), **f32)
    loss = torch.empty((), **f32)
    launcher(_dino_finalize_kernel)[(1,)](
        pm, pl, pd, student_lse, loss, B, R, tiling.nsplit, 1.0 / (num_pairs(ncrops) * B),
        **tiling.kwargs("_dino_finalize_kernel"),
    )
    return loss, student_lse, teacher_lse, center_copy


def dino_loss_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    ncrops: int,
    student_temp: float,
    teacher_temp: float,
    block_k: Optional[int] = None,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the student logits, (ncrops * B, K) in the student's dtype."""
    student, teacher, center = student.contiguous(), teacher.contiguous(), center.contiguous()
    R, K = student.shape
    B = R // ncrops
    tiling = _Tiling(B, K, ncrops, student.device, block_k, chunk)
    grad_student = torch.empty_like(student)
    launcher(_dino_bwd_kernel)[(B, tiling.nsplit)](
        grad.reshape(()), student, teacher, center, teacher_lse, student_lse, grad_student,
        B, K, ncrops, 1.0 / student_temp, 1.0 / teacher_temp, 1.0 / (num_pairs(ncrops) * B),
        CHUNK=tiling.chunk, **tiling.kwargs("_dino_bwd_kernel"),
    )
    return grad_student


def dino_center_update(center: torch.Tensor, teacher: torch.Tensor, momentum: float,
                       block_k: Optional[int] = None) -> torch.Tensor:
    """``momentum * center + (1 - momentum) * teacher.sum(0) / R`` in one pass (single process: a multi-process
    run must all-reduce the column sums between the two steps); shape of ``center``, dtype
    ``promote(center, teacher)``."""
    teacher = teacher.contiguous()
    R, K = teacher.shape
    out = torch.empty(center.shape, device=center.device, dtype=torch.promote_types(center.dtype, teacher.dtype))
    cfg = launch_table(1, K, 2, device_target(teacher.device))["_dino_center_kernel"]
    if block_k is not None:  # tests: a narrower tile
        cfg = LaunchConfig.of(num_warps=cfg.num_warps, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=block_k)
    launcher(_dino_center_kernel)[(triton.cdiv(K, cfg["BLOCK_K"]),)](
        teacher, center.contiguous(), out, R, K, float(momentum), 1.0 / R, **cfg.kwargs(),
    )
    return out
