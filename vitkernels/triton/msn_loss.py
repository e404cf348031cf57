"""Triton kernels for the fused MSN loss (semantics: :mod:`vitkernels.reference.msn_loss`, identity prototype labels).

N = num_views * B anchor rows (row i pairs with target row i % B), B target rows, K prototypes of dimension D.
With ``z = cos(row, prototype) / tau`` (rows: the N anchors then the B targets) and ``p = softmax(z_anchor)``:

* targets ``t = softmax(z_target / T)`` (= sharpen(softmax(z_target), T), exactly), optionally Sinkhorn-balanced
  by the caller between the target and the anchor kernels;
* ``ce_i = -sum_k t_ik (z_ik - lse_i)`` (0 where the target is 0: no log of 0 is taken), ``S_i = sum_k t_ik``;
* ``H_i = -sum_k p_ik (z_ik - lse_i)``; ``a = mean_i p_i``; me-max ``rloss = sum_k a_k log a_k + log K``.

Backward, for upstream gradients (g_ce, g_r, g_s) of (mean ce, rloss, mean H)::

    dL/dz_ij = 1/N * [ g_ce (S_i p_ij - t_ij) + g_r p_ij (log a_j - sum_k p_ik log a_k) - g_s p_ij (log p_ij + H_i) ]

then through ``z = (A_i . P_k) r_i r_k / tau`` (r = 1 / max(||.||, 1e-12), as ``F.normalize``) to the anchors and
prototypes: ``G = dL/dz @ P_hat / tau`` and ``dA_i = r_i (G_i - A_hat_i <A_hat_i, G_i>)``, and likewise for the
prototypes with ``dL/dz^T @ A_hat``. The projections need no full row of G: ``<A_hat_i, G_i> = sum_k dC_ik cos_ik``
with ``dC = dL/dz / tau`` and ``cos = tau z`` (and the column sums for the prototypes), so they come out of the
kernel that writes dC, and the gradient GEMMs tile D like any GEMM.

Kernels:

* ``_msn_logits_kernel``      grid (rows / BM, K / BN): the cosine logits of anchors and targets in one GEMM
  (tl.dot over D tiles), the L2 norms accumulated in the same loop (nothing normalised is materialised);
* ``_msn_targets_kernel``     grid (B,): sharpened targets, two passes over the row;
* ``_msn_anchor_fwd_kernel``  grid (N / BR,): per anchor row log-sum-exp, cross-entropy, entropy; per row block the
  column sums of p (deterministic partials, no atomics);
* ``_msn_finalize_kernel``    grid (1,): the three terms and the mean probabilities a;
* ``_msn_anchor_bwd_kernel``  grid (N / BR,): dC = dL/dz / tau for the anchor logits and the projections;
* ``_msn_grad_gemm_kernel``   grid (rows / BM, D / BD), twice: the anchor and prototype gradients, GEMM with the
  normalisation backward as epilogue.

All math in fp32. bf16 / fp16 inputs run both GEMMs on tensor cores in their dtype with fp32 accumulation
(``HALF_DOT``); fp32 products use TF32 exactly when torch's matmuls would (``torch.backends.cuda.matmul
.allow_tf32``, off by default), so the logits match the eager loss. Under the interpreter the operands are fp32.
Every launch's tiles come from :func:`launch_table`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkernels.triton import interpreter_active
from vitkernels.triton._launch import (
    GATE_TARGETS,
    Example,
    LaunchConfig,
    Target,
    device_target,
    half_dtype,
    launcher,
    tile_names,
)

NORM_EPS = 1e-12  # F.normalize's eps
TINY = 1.1754943508222875e-38  # float32 tiny: log(max(a, TINY)) keeps 0 * log 0 at 0, as the reference


@tile_names("BM", "BN", "BD")
@triton.jit
def _msn_logits_kernel(
    a_ptr, x_ptr, p_ptr, z_ptr, rn_ptr, N, NB, K, D, inv_tau,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr, HALF_DOT: tl.constexpr,
):
    inv_tau = tl.cast(inv_tau, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    rmask = rows < NB
    cmask = cols < K
    is_anchor = rows < N
    acc = tl.zeros((BM, BN), tl.float32)
    ssq_r = tl.zeros((BM,), tl.float32)
    ssq_c = tl.zeros((BN,), tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dmask = ds < D
        # rows < N come from the anchors, the others from the targets: two loads with complementary masks
        qa = tl.load(a_ptr + rows[:, None] * D + ds[None, :], mask=(rmask & is_anchor)[:, None] & dmask[None, :],
                     other=0.0)
        qx = tl.load(x_ptr + (rows - N)[:, None] * D + ds[None, :],
                     mask=(rmask & ~is_anchor)[:, None] & dmask[None, :], other=0.0)
        p = tl.load(p_ptr + cols[:, None] * D + ds[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if HALF_DOT:
            # bf16 / fp16 operands on tensor cores, fp32 accumulation: their products are exact in fp32, so this
            # equals the fp32 product of the upcast values up to the order of the sum
            acc = tl.dot(tl.where(is_anchor[:, None], qa, qx), tl.trans(p), acc)
            q = qa.to(tl.float32) + qx.to(tl.float32)
            p = p.to(tl.float32)
        else:
            q = qa.to(tl.float32) + qx.to(tl.float32)
            p = p.to(tl.float32)
            acc = tl.dot(q, tl.trans(p), acc, input_precision=PRECISION)
        ssq_r += tl.sum(q * q, axis=1)
        ssq_c += tl.sum(p * p, axis=1)
    r_rows = 1.0 / tl.maximum(tl.sqrt(ssq_r), 1e-12)
    r_cols = 1.0 / tl.maximum(tl.sqrt(ssq_c), 1e-12)
    z = acc * r_rows[:, None] * r_cols[None, :] * inv_tau
    tl.store(z_ptr + rows[:, None] * K + cols[None, :], z, mask=rmask[:, None] & cmask[None, :])
    if pid_n == 0:
        tl.store(rn_ptr + rows, r_rows, mask=rmask)
    if pid_m == 0:
        tl.store(rn_ptr + NB + cols, r_cols, mask=cmask)


@tile_names("BK")
@triton.jit
def _msn_targets_kernel(z_ptr, t_ptr, N, K, inv_T, BK: tl.constexpr):
    inv_T = tl.cast(inv_T, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    b = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + (N + b) * K
    lanes = tl.arange(0, BK)
    m_vec = tl.full((BK,), float("-inf"), tl.float32)
    l_vec = tl.zeros((BK,), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + lanes
        x = tl.load(z_row + cols, mask=cols < K, other=float("-inf")) * inv_T
        m_new = tl.maximum(m_vec, x)
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        l_vec = l_vec * tl.exp(m_vec - shift) + tl.exp(x - shift)
        m_vec = m_new
    top = tl.max(m_vec, axis=0)
    lse = top + tl.log(tl.sum(l_vec * tl.exp(m_vec - top), axis=0))
    for k0 in range(0, K, BK):
        cols = k0 + lanes
        cmask = cols < K
        x = tl.load(z_row + cols, mask=cmask, other=float("-inf")) * inv_T
        tl.store(t_ptr + b * K + cols, tl.exp(x - lse), mask=cmask)


@tile_names("BR", "BK")
@triton.jit
def _msn_anchor_fwd_kernel(
    z_ptr, t_ptr, stats_ptr, colsum_ptr, N, B, K,
    BR: tl.constexpr, BK: tl.constexpr, ME_MAX: tl.constexpr, ENTROPY: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < N
    t_rows = rows % B
    # pass 1: each row's log-sum-exp (online over class tiles)
    m = tl.full((BR,), float("-inf"), tl.float32)
    l = tl.zeros((BR,), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        z = tl.load(z_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & (cols < K)[None, :],
                    other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
    lse = tl.where(rmask, m + tl.log(tl.where(rmask, l, 1.0)), 0.0)
    # pass 2: cross-entropy and entropy from the log-probabilities z - lse term by term (as log_softmax: no
    # cancellation between lse and <., z> when the distributions are peaked), column sums of p for me-max
    ce = tl.zeros((BR,), tl.float32)
    ts = tl.zeros((BR,), tl.float32)
    entropy = tl.zeros((BR,), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        z = tl.load(z_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=float("-inf"))
        t = tl.load(t_ptr + t_rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
        log_p = tl.where(mask, z - lse[:, None], 0.0)
        ce -= tl.sum(t * log_p, axis=1)
        ts += tl.sum(t, axis=1)
        if ME_MAX or ENTROPY:
            p = tl.exp(z - lse[:, None])
            if ME_MAX:
                tl.store(colsum_ptr + pid * K + cols, tl.sum(p, axis=0), mask=cmask)
            if ENTROPY:
                entropy -= tl.sum(p * log_p, axis=1)
    tl.store(stats_ptr + rows * 4 + 0, lse, mask=rmask)
    tl.store(stats_ptr + rows * 4 + 1, ts, mask=rmask)
    tl.store(stats_ptr + rows * 4 + 2, entropy, mask=rmask)
    tl.store(stats_ptr + rows * 4 + 3, ce, mask=rmask)


@tile_names("BR", "BK")
@triton.jit
def _msn_finalize_kernel(
    stats_ptr, colsum_ptr, avg_ptr, terms_ptr, N, K, NBLK, inv_N, log_K,
    BR: tl.constexpr, BK: tl.constexpr, ME_MAX: tl.constexpr, ENTROPY: tl.constexpr,
):
    inv_N = tl.cast(inv_N, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    log_K = tl.cast(log_K, tl.float32)
    ce = tl.zeros((BR,), tl.float32)
    ent = tl.zeros((BR,), tl.float32)
    for r0 in range(0, N, BR):
        rows = r0 + tl.arange(0, BR)
        rmask = rows < N
        ce += tl.load(stats_ptr + rows * 4 + 3, mask=rmask, other=0.0)
        ent += tl.load(stats_ptr + rows * 4 + 2, mask=rmask, other=0.0)
    tl.store(terms_ptr + 0, tl.sum(ce, axis=0) * inv_N)
    tl.store(terms_ptr + 2, tl.sum(ent, axis=0) * inv_N if ENTROPY else 0.0)
    rloss = tl.zeros((BK,), tl.float32)
    if ME_MAX:
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < K
            total = tl.zeros((BK,), tl.float32)
            for j in range(0, NBLK):
                total += tl.load(colsum_ptr + j * K + cols, mask=cmask, other=0.0)
            avg = total * inv_N
            tl.store(avg_ptr + cols, avg, mask=cmask)
            rloss += tl.where(cmask, avg * tl.log(tl.maximum(avg, 1.1754943508222875e-38)), 0.0)
    tl.store(terms_ptr + 1, tl.sum(rloss, axis=0) + log_K if ME_MAX else 0.0)


@tile_names("BR", "BK")
@triton.jit
def _msn_anchor_bwd_kernel(
    g_ptr, z_ptr, t_ptr, stats_ptr, avg_ptr, dc_ptr, proj_a_ptr, proj_p_ptr, N, B, K, inv_N, tau,
    BR: tl.constexpr, BK: tl.constexpr, ME_MAX: tl.constexpr, ENTROPY: tl.constexpr,
):
    """dC = dL/dcos = dL/dz / tau for a block of anchor rows, and the normalisation backward's projections
    <dC, cos> along the rows (per anchor) and the columns (per prototype, one partial per row block)."""
    inv_N = tl.cast(inv_N, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    tau = tl.cast(tau, tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < N
    t_rows = rows % B
    g_ce = tl.load(g_ptr + 0)
    lse = tl.load(stats_ptr + rows * 4 + 0, mask=rmask, other=0.0)
    ts = tl.load(stats_ptr + rows * 4 + 1, mask=rmask, other=0.0)
    entropy = tl.load(stats_ptr + rows * 4 + 2, mask=rmask, other=0.0)
    # c_i = sum_k p_ik log a_k, the me-max gradient's per-row baseline
    c = tl.zeros((BR,), tl.float32)
    if ME_MAX:
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < K
            z = tl.load(z_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=float("-inf"))
            log_a = tl.log(tl.maximum(tl.load(avg_ptr + cols, mask=cmask, other=1.0), 1.1754943508222875e-38))
            c += tl.sum(tl.exp(z - lse[:, None]) * log_a[None, :], axis=1)
    scale = inv_N / tau
    proj_a = tl.zeros((BR,), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        z = tl.load(z_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=float("-inf"))
        t = tl.load(t_ptr + t_rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
        p = tl.exp(z - lse[:, None])
        z = tl.where(mask, z, 0.0)
        dz = g_ce * (ts[:, None] * p - t)
        if ME_MAX:
            log_a = tl.log(tl.maximum(tl.load(avg_ptr + cols, mask=cmask, other=1.0), 1.1754943508222875e-38))
            dz += tl.load(g_ptr + 1) * p * (log_a[None, :] - c[:, None])
        if ENTROPY:
            dz -= tl.load(g_ptr + 2) * p * (z - lse[:, None] + entropy[:, None])
        dc = dz * scale
        tl.store(dc_ptr + rows[:, None] * K + cols[None, :], dc, mask=mask)
        dc_cos = dc * z * tau
        proj_a += tl.sum(dc_cos, axis=1)
        tl.store(proj_p_ptr + pid * K + cols, tl.sum(dc_cos, axis=0), mask=cmask)
    tl.store(proj_a_ptr + rows, proj_a, mask=rmask)


@tile_names("BM", "BL", "BD")
@triton.jit
def _msn_grad_gemm_kernel(
    m_ptr, stride_mr, stride_ml, y_ptr, s_ptr, x_ptr, rn_ptr, proj_ptr, dx_ptr, R, L, D, NPART, m_scale,
    BM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr, HALF_DOT: tl.constexpr,
):
    """dX = r (G - X_hat proj) with G = M @ (s[:, None] * Y): the normalisation backward of X_hat = r X, where
    proj = <X_hat, G> (= sum of the NPART partials at proj_ptr, computed from the logits by the caller) and
    r = 1 / max(||X||, eps). M (R, L) is read through its strides, Y is (L, D).

    HALF_DOT (bf16 / fp16 inputs): the product runs on tensor cores in Y's dtype, with operands ``m_scale * M``
    (M = dL/dz / (N tau): the scale brings it back to dL/dz, of order 1, clear of fp16's subnormals) and
    ``s * Y`` (the normalised rows, |.| <= 1); the accumulator is divided by ``m_scale`` after."""
    m_scale = tl.cast(m_scale, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    rmask = rows < R
    dmask = ds < D
    acc = tl.zeros((BM, BD), tl.float32)
    for l0 in range(0, L, BL):
        ls = l0 + tl.arange(0, BL)
        lmask = ls < L
        m = tl.load(m_ptr + rows[:, None] * stride_mr + ls[None, :] * stride_ml,
                    mask=rmask[:, None] & lmask[None, :], other=0.0)
        y = tl.load(y_ptr + ls[:, None] * D + ds[None, :], mask=lmask[:, None] & dmask[None, :], other=0.0)
        s = tl.load(s_ptr + ls, mask=lmask, other=0.0)
        if HALF_DOT:
            acc = tl.dot((m * m_scale).to(y.dtype), (y.to(tl.float32) * s[:, None]).to(y.dtype), acc)
        else:
            acc = tl.dot(m, y.to(tl.float32) * s[:, None], acc, input_precision=PRECISION)
    if HALF_DOT:
        acc = acc / m_scale
    proj = tl.zeros((BM,), tl.float32)
    for j in range(0, NPART):
        proj += tl.load(proj_ptr + j * R + rows, mask=rmask, other=0.0)
    rn = tl.load(rn_ptr + rows, mask=rmask, other=0.0)
    # F.normalize divides by max(||x||, eps): where the norm is clamped (rn = 1/eps) the divisor is a constant
    proj = tl.where(rn < 1e12, proj, 0.0)
    x = tl.load(x_ptr + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    dx = rn[:, None] * (acc - x.to(tl.float32) * (rn * proj)[:, None])
    tl.store(dx_ptr + rows[:, None] * D + ds[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


# --- launch configuration table -------------------------------------------------------------------------------------

def _class_block(K: int, widest: int) -> int:
    """Class lanes per tile: ``widest`` when K reaches it, else 256 or 64 (masked past K)."""
    return widest if K >= widest else (256 if K >= 256 else 64)


def launch_table(K: int, dtype: torch.dtype, target: Target) -> Dict[str, LaunchConfig]:
    """Tiles and warps of the MSN kernels, by kernel name (the same on every GPU and under the interpreter).

    The two GEMMs: (64 x 64) logit tiles over D steps of 32 on 8 warps; (32 rows x 64 features) gradient tiles
    over reduction steps of 16 for fp32 (full-fp32 products hold more registers than half ones); bf16 / fp16
    inputs run both on tensor cores (``HALF_DOT``), the gradient in 64-row tiles (one warpgroup: wgmma on sm_90). Row kernels: 16 rows x 256 classes (64 for
    small K); the targets and finalize kernels walk rows in 1024-class tiles (256 / 64 for small K)."""
    half = dtype in (torch.float16, torch.bfloat16)
    bk = _class_block(K, 256)
    wide = _class_block(K, 1024)
    return {
        "_msn_logits_kernel": LaunchConfig.of(num_warps=8, num_stages=3, BM=64, BN=64, BD=32),
        "_msn_targets_kernel": LaunchConfig.of(num_warps=4 if wide >= 512 else 1, BK=wide),
        "_msn_anchor_fwd_kernel": LaunchConfig.of(num_warps=4, BR=16, BK=bk),
        "_msn_finalize_kernel": LaunchConfig.of(num_warps=4, BR=256, BK=wide),
        "_msn_anchor_bwd_kernel": LaunchConfig.of(num_warps=8 if bk >= 256 else 4, BR=16, BK=bk),
        "_msn_grad_gemm_kernel": LaunchConfig.of(num_warps=4, num_stages=3, BM=64 if half else 32,
                                                 BL=32 if half else 16, BD=64),
    }


def table_examples() -> List[Example]:
    """Every configuration of :func:`launch_table` (K classes below 256, below 1024, above; fp32 / half), each with
    a tiny problem: (B, num_views, K, D, dtype)."""
    out, seen = [], set()
    for target in GATE_TARGETS:
        for dtype in (torch.float32, half_dtype(target)):
            for B, V, K, D in ((3, 2, 70, 40), (2, 3, 300, 24), (2, 2, 1100, 20)):
                table = launch_table(K, dtype, target)
                key = (target.arch, dtype, tuple(sorted(table.items())))
                if key not in seen:
                    seen.add(key)
                    out.append(Example("msn_loss", (B, V, K, D, dtype), target, table))
    return out


# --- host side ----------------------------------------------------------------------------------------------------

def _precision() -> str:
    if not interpreter_active() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _table(K: int, dtype: torch.dtype, device: torch.device) -> Dict[str, LaunchConfig]:
    return launch_table(K, dtype, device_target(device))


def _half_dot(dtype: torch.dtype) -> bool:
    """Tensor-core products in the input dtype (not under the interpreter, whose bf16 / fp16 dots are wrong)."""
    return dtype in (torch.float16, torch.bfloat16) and not interpreter_active()


def msn_logits(anchors: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor, tau: float
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``z = cos / tau`` for the N anchor rows then the B target rows, (N + B, K) fp32, and the inverse row norms
    ``1 / max(||.||, eps)`` of the anchors, targets and prototypes, (N + B + K,) fp32."""
    anchors, targets, prototypes = anchors.contiguous(), targets.contiguous(), prototypes.contiguous()
    N, D = anchors.shape
    NB = N + targets.shape[0]
    K = prototypes.shape[0]
    f32 = dict(device=anchors.device, dtype=torch.float32)
    logits = torch.empty((NB, K), **f32)
    rnorm = torch.empty((NB + K,), **f32)
    cfg = _table(K, anchors.dtype, anchors.device)["_msn_logits_kernel"]
    grid = (triton.cdiv(NB, cfg["BM"]), triton.cdiv(K, cfg["BN"]))
    launcher(_msn_logits_kernel)[grid](
        anchors, targets, prototypes, logits, rnorm, N, NB, K, D, 1.0 / tau,
        PRECISION=_precision(), HALF_DOT=_half_dot(anchors.dtype), **cfg.kwargs(),
    )
    return logits, rnorm


def msn_targets(logits: torch.Tensor, num_anchors: int, T: float) -> torch.Tensor:
    """Sharpened targets ``softmax(z_target / T)``, (B, K) fp32, from the target rows of ``logits``."""
    B = logits.shape[0] - num_anchors
    K = logits.shape[1]
    targets = torch.empty((B, K), device=logits.device, dtype=torch.float32)
    cfg = _table(K, logits.dtype, logits.device)["_msn_targets_kernel"]
    launcher(_msn_targets_kernel)[(B,)](logits, targets, num_anchors, K, 1.0 / T, **cfg.kwargs())
    return targets


def msn_anchor_fwd(
    logits: torch.Tensor, targets: torch.Tensor, num_anchors: int, me_max: bool, use_entropy: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``terms`` (3,) = (ce, rloss, sloss) fp32 (0 for a term that is off), per-anchor statistics (N, 4) =
    (lse, sum of targets, entropy, ce) and the mean probabilities (K,) (zeros without me-max)."""
    logits, targets = logits.contiguous(), targets.contiguous()
    N, (B, K) = num_anchors, targets.shape
    dev = logits.device
    table = _table(K, logits.dtype, dev)
    cfg = table["_msn_anchor_fwd_kernel"]
    nblk = triton.cdiv(N, cfg["BR"])
    stats = torch.empty((N, 4), device=dev, dtype=torch.float32)
    colsum = torch.empty((nblk, K) if me_max else (1,), device=dev, dtype=torch.float32)
    launcher(_msn_anchor_fwd_kernel)[(nblk,)](
        logits, targets, stats, colsum, N, B, K, ME_MAX=me_max, ENTROPY=use_entropy, **cfg.kwargs(),
    )
    avg = (torch.empty if me_max else torch.zeros)((K,), device=dev, dtype=torch.float32)
    terms = torch.empty((3,), device=dev, dtype=torch.float32)
    launcher(_msn_finalize_kernel)[(1,)](
        stats, colsum, avg, terms, N, K, nblk, 1.0 / N, math.log(K),
        ME_MAX=me_max, ENTROPY=use_entropy, **table["_msn_finalize_kernel"].kwargs(),
    )
    return terms, stats, avg


def msn_bwd(
    grad_terms: torch.Tensor,
    anchors: torch.Tensor,
    prototypes: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    rnorm: torch.Tensor,
    stats: torch.Tensor,
    avg: torch.Tensor,
    tau: float,
    me_max: bool,
    use_entropy: bool,
    need_anchors: bool,
    need_prototypes: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients w.r.t. the anchors (N, D) and the prototypes (K, D), in their dtypes (None where not needed)."""
    anchors, prototypes = anchors.contiguous(), prototypes.contiguous()
    logits, targets = logits.contiguous(), targets.contiguous()
    N, D = anchors.shape
    B, K = targets.shape
    NB = N + B
    f32 = dict(device=anchors.device, dtype=torch.float32)
    table = _table(K, anchors.dtype, anchors.device)
    cfg = table["_msn_anchor_bwd_kernel"]
    nblk = triton.cdiv(N, cfg["BR"])
    dc = torch.empty((N, K), **f32)
    proj_a = torch.empty((N,), **f32)
    proj_p = torch.empty((nblk, K), **f32)
    launcher(_msn_anchor_bwd_kernel)[(nblk,)](
        grad_terms.to(torch.float32).contiguous(), logits, targets, stats, avg, dc, proj_a, proj_p, N, B, K,
        1.0 / N, tau, ME_MAX=me_max, ENTROPY=use_entropy, **cfg.kwargs(),
    )
    cfg = table["_msn_grad_gemm_kernel"]
    bm, bd = cfg["BM"], cfg["BD"]
    # dC = dL/dz / (N tau): the half path multiplies it by N tau before rounding it to the input dtype
    gemm = dict(PRECISION=_precision(), HALF_DOT=_half_dot(anchors.dtype), **cfg.kwargs())
    m_scale = float(N * tau)
    grad_anchors = grad_prototypes = None
    if need_anchors:
        grad_anchors = torch.empty_like(anchors)
        # G = dC @ (r_k P_k), then the normalisation backward with the anchors' norms
        launcher(_msn_grad_gemm_kernel)[(triton.cdiv(N, bm), triton.cdiv(D, bd))](
            dc, K, 1, prototypes, rnorm[NB:], anchors, rnorm[:N], proj_a, grad_anchors, N, K, D, 1, m_scale, **gemm,
        )
    if need_prototypes:
        grad_prototypes = torch.empty_like(prototypes)
        # G = dC^T @ (r_i A_i) (dC read transposed through its strides), then the prototypes' normalisation backward
        launcher(_msn_grad_gemm_kernel)[(triton.cdiv(K, bm), triton.cdiv(D, bd))](
            dc, 1, K, anchors, rnorm[:N], prototypes, rnorm[NB:], proj_p, grad_prototypes, K, N, D, nblk, m_scale,
            **gemm,
        )
    return grad_anchors, grad_prototypes
