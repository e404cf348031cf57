"""Triton kernels for Swin V2 (shifted) window attention: scaled cosine attention with a continuous position bias;
semantics in :mod:`vitkernels.reference.window_attention_v2`.

Everything V1 does by addressing, V2 does with V1's own helpers (imported below): ``_window_rows`` (window token ->
source token, padding, mask region: the shift / partition arithmetic), ``_load_rows`` (a head's q, k or v rows, padded
rows = the qkv bias), ``_scores`` (the dot, the bias gathered from the table by relative position, the mask, -inf
past N) and ``_dot``; launch tiles, dot flags, backward grouping and support limits are V1's too. Nothing is
materialised.

Per (window, head), in fp32: ``q^ = q / max(|q|, 1e-12)``, ``k^`` likewise (rows of the head, F.normalize);
``S = tau_h (q^ k^T) + table[rel(i, j), h] + mask(i, j)`` (the dot in the storage dtype as timm's matmul, IEEE fp32
for fp32), ``P = softmax(S)``, ``O = P v``; the row log-sum-exp is kept for the backward.

Backward, recomputing P (delta = rowsum(dO * O)): ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)``,
``G = dS k^``, ``d tau_h = sum_i q^_i . G_i``, ``dq = tau (G - q^ (q^ . G)) / |q|`` (``tau G / eps`` where
``|q| < eps``: F.normalize's clamp), and likewise ``dk`` from ``Gk = dS^T q^`` accumulated over the query tiles.
The table gradient and the padded tokens' (qkv-bias) gradients are reduced as in V1; the per-(window group, head)
partial ``d tau`` sums are added by torch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from vitkernels.triton._launch import launcher
from vitkernels.triton.window_attention import _dot, _dot_flags, _geometry, _load_rows, _scores, _tiles, _window_groups, _window_rows, supported_reason  # noqa: E501,F401  (V1's helpers: one line to retarget)

NORMALIZE_EPS = tl.constexpr(1e-12)  # F.normalize's default eps


@triton.jit
def _l2_normalize(x):
    """fp32 rows of ``x`` (M, HD) divided by max(|row|, eps), and |row| (M,)."""
    x = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    return x / tl.maximum(norm, NORMALIZE_EPS)[:, None], norm


@triton.jit
def _l2_normalize_bwd(x_hat, g, norm, tau):
    """Gradient of the rows x from dx^ = tau * g (F.normalize's backward: the norm's gradient passes where
    |x| >= eps), and the rows' x^ . g (their share of d tau)."""
    dot = tl.sum(x_hat * g, 1)
    passes = norm >= NORMALIZE_EPS
    dx = tl.where(passes[:, None], g - x_hat * dot[:, None], g) * tau / tl.maximum(norm, NORMALIZE_EPS)[:, None]
    return dx, dot


@triton.jit
def _window_attention_v2_fwd_kernel(
    qkv_ptr, table_ptr, scale_ptr, bias_ptr, out_ptr, lse_ptr,
    H, W, nWh, nWw, NH,
    N: tl.constexpr, HD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    w = tl.program_id(0).to(tl.int64)  # windows on axis 0: up to 2**31 - 1 of them
    h = tl.program_id(1)
    C = NH * HD
    CH = 3 * C
    cols = tl.arange(0, BLOCK_N)
    k_tok, k_real, k_valid, k_region = _window_rows(w, cols, N, H, W, nWh, nWw, WH, WW, SH, SW)
    k = _load_rows(qkv_ptr, bias_ptr, k_tok, k_real, k_valid, C + h * HD, HD, CH, HAS_BIAS)
    v = _load_rows(qkv_ptr, bias_ptr, k_tok, k_real, k_valid, 2 * C + h * HD, HD, CH, HAS_BIAS)
    k_hat, _ = _l2_normalize(k)
    k_hat = k_hat.to(k.dtype)
    tau = tl.load(scale_ptr + h).to(tl.float32)
    d = tl.arange(0, HD)
    for m0 in tl.static_range(0, BLOCK_N, BLOCK_M):
        if m0 < N:
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tok, q_real, q_valid, q_region = _window_rows(w, rows, N, H, W, nWh, nWw, WH, WW, SH, SW)
            q = _load_rows(qkv_ptr, bias_ptr, q_tok, q_real, q_valid, h * HD, HD, CH, HAS_BIAS)
            q_hat, _ = _l2_normalize(q)
            s = _scores(q_hat.to(q.dtype), k_hat, tau, table_ptr, h, NH, rows, cols, q_valid, k_valid, q_region,
                        k_region, WW, WH, SHIFTED, DOT_FP32, IEEE)
            row_max = tl.max(s, 1)
            p = tl.exp(s - row_max[:, None])
            denom = tl.sum(p, 1)
            p = p / denom[:, None]
            o = _dot(p.to(v.dtype), v, DOT_FP32, IEEE)
            tl.store(out_ptr + q_tok[:, None] * C + h * HD + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=q_real[:, None])
            tl.store(lse_ptr + (w * NH + h) * N + rows, row_max + tl.log(denom), mask=q_valid)


@triton.jit
def _window_attention_v2_bwd_kernel(
    qkv_ptr, table_ptr, scale_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr,
    dqkv_ptr, dbias_rel_ptr, dbias_rel_atomic_ptr, dqkv_bias_ptr, dscale_ptr,
    num_windows, windows_per_program, H, W, nWh, nWw, NH,
    N: tl.constexpr, HD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)  # a group of windows: g * windows_per_program, ...
    h = tl.program_id(1)
    C = NH * HD
    CH = 3 * C
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, HD)
    ONE_TILE: tl.constexpr = BLOCK_M >= BLOCK_N
    tau = tl.load(scale_ptr + h).to(tl.float32)
    d_rel = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)  # sum over this group's windows of dS (one tile)
    d_pad_k = tl.zeros((HD,), dtype=tl.float32)  # padded tokens' dK / dV, summed: the qkv-bias gradient
    d_pad_v = tl.zeros((HD,), dtype=tl.float32)
    d_tau = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per query row slot: sum of q^ . G
    for i in range(0, windows_per_program):
        w = g * windows_per_program + i
        if w < num_windows:
            k_tok, k_real, k_valid, k_region = _window_rows(w, cols, N, H, W, nWh, nWw, WH, WW, SH, SW)
            k = _load_rows(qkv_ptr, bias_ptr, k_tok, k_real, k_valid, C + h * HD, HD, CH, HAS_BIAS)
            v = _load_rows(qkv_ptr, bias_ptr, k_tok, k_real, k_valid, 2 * C + h * HD, HD, CH, HAS_BIAS)
            k_hat, k_norm = _l2_normalize(k)
            k_hat_s = k_hat.to(k.dtype)  # the dots' operand, as in the forward
            gk = tl.zeros((BLOCK_N, HD), dtype=tl.float32)  # dS^T q^, over the query tiles
            dv = tl.zeros((BLOCK_N, HD), dtype=tl.float32)
            for m0 in tl.static_range(0, BLOCK_N, BLOCK_M):
                if m0 < N:
                    rows = m0 + tl.arange(0, BLOCK_M)
                    q_tok, q_real, q_valid, q_region = _window_rows(w, rows, N, H, W, nWh, nWw, WH, WW, SH, SW)
                    q = _load_rows(qkv_ptr, bias_ptr, q_tok, q_real, q_valid, h * HD, HD, CH, HAS_BIAS)
                    q_hat, q_norm = _l2_normalize(q)
                    q_hat_s = q_hat.to(q.dtype)
                    # padded query rows are cropped from the output: their dO is 0
                    o_offs = q_tok[:, None] * C + h * HD + d[None, :]
                    do = tl.load(dout_ptr + o_offs, mask=q_real[:, None], other=0.0)
                    o = tl.load(out_ptr + o_offs, mask=q_real[:, None], other=0.0)
                    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                    lse = tl.load(lse_ptr + (w * NH + h) * N + rows, mask=q_valid, other=0.0)
                    s = _scores(q_hat_s, k_hat_s, tau, table_ptr, h, NH, rows, cols, q_valid, k_valid, q_region,
                                k_region, WW, WH, SHIFTED, DOT_FP32, IEEE)
                    p = tl.exp(s - lse[:, None])
                    p = tl.where(q_valid[:, None], p, 0.0)
                    dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, IEEE)
                    dp = _dot(do, tl.trans(v), DOT_FP32, IEEE)
                    ds = p * (dp - delta[:, None])
                    gq = _dot(ds.to(k.dtype), k_hat_s, DOT_FP32, IEEE)
                    dq, qg = _l2_normalize_bwd(q_hat, gq, q_norm, tau)
                    d_tau += tl.where(q_valid, qg, 0.0)
                    tl.store(dqkv_ptr + q_tok[:, None] * CH + h * HD + d[None, :], dq.to(dqkv_ptr.dtype.element_ty),
                             mask=q_real[:, None])
                    gk += _dot(tl.trans(ds.to(q.dtype)), q_hat_s, DOT_FP32, IEEE)
                    pair = q_valid[:, None] & k_valid[None, :]
                    if ONE_TILE:
                        d_rel += tl.where(pair, ds, 0.0)
                    else:
                        tl.atomic_add(dbias_rel_atomic_ptr + (h * N + rows[:, None]) * N + cols[None, :], ds, mask=pair)
            dk, _ = _l2_normalize_bwd(k_hat, gk, k_norm, tau)
            k_offs = k_tok[:, None] * CH + h * HD + d[None, :]
            tl.store(dqkv_ptr + k_offs + C, dk.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
            tl.store(dqkv_ptr + k_offs + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
            if HAS_BIAS:
                is_pad = (k_valid & ~k_real)[:, None]
                d_pad_k += tl.sum(tl.where(is_pad, dk, 0.0), 0)
                d_pad_v += tl.sum(tl.where(is_pad, dv, 0.0), 0)
    if ONE_TILE:
        rr = tl.arange(0, BLOCK_N)
        tl.store(dbias_rel_ptr + ((g * NH + h) * N + rr[:, None]) * N + cols[None, :], d_rel,
                 mask=(rr[:, None] < N) & (cols[None, :] < N))
    if HAS_BIAS:
        tl.store(dqkv_bias_ptr + ((g * NH + h) * 2) * HD + d, d_pad_k)
        tl.store(dqkv_bias_ptr + ((g * NH + h) * 2 + 1) * HD + d, d_pad_v)
    tl.store(dscale_ptr + g * NH + h, tl.sum(d_tau, 0))


# --- host side ------------------------------------------------------------------------------------------------------

def window_attention_v2_fwd(
    qkv: torch.Tensor,
    table: torch.Tensor,
    scale: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3C) qkv -> ((B, H, W, C) out, (B*nW, nH, N) fp32 row log-sum-exp)."""
    qkv = qkv.contiguous()
    table = table.contiguous()
    scale = scale.contiguous()
    B, H, W, hd, nWh, nWw, N = _geometry(qkv, window_size, num_heads)
    num_windows = B * nWh * nWw
    out = torch.empty((B, H, W, num_heads * hd), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((num_windows, num_heads, N), device=qkv.device, dtype=torch.float32)
    block_m, block_n = _tiles(N, hd)
    bias = qkv_bias.contiguous() if qkv_bias is not None else qkv
    launcher(_window_attention_v2_fwd_kernel)[(num_windows, num_heads)](
        qkv, table, scale, bias, out, lse, H, W, nWh, nWw, num_heads,
        N=N, HD=hd, WH=window_size[0], WW=window_size[1], SH=shift_size[0], SW=shift_size[1],
        HAS_BIAS=qkv_bias is not None, SHIFTED=bool(shift_size[0] or shift_size[1]), BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=4 if block_n <= 64 else 8, **_dot_flags(qkv.dtype),
    )
    return out, lse


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
    relative_position_index: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients (qkv, table, scale, qkv_bias or None) of :func:`window_attention_v2_fwd`, in the inputs' dtypes."""
    qkv = qkv.contiguous()
    table = table.contiguous()
    scale = scale.contiguous()
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    B, H, W, hd, nWh, nWw, N = _geometry(qkv, window_size, num_heads)
    num_windows = B * nWh * nWw
    block_m, block_n = _tiles(N, hd)
    groups = _window_groups(num_windows, num_heads, qkv.device)
    per_program = -(-num_windows // groups)
    groups = -(-num_windows // per_program)
    dqkv = torch.empty_like(qkv)  # every real token's q, k and v rows are written (each is in one window)
    one_tile = block_m >= block_n
    dev = qkv.device
    d_rel = torch.empty((groups, num_heads, N, N), device=dev, dtype=torch.float32) if one_tile else None
    d_rel_atomic = None if one_tile else torch.zeros((num_heads, N, N), device=dev, dtype=torch.float32)
    has_bias = qkv_bias is not None
    d_pad = torch.empty((groups, num_heads, 2, hd), device=dev, dtype=torch.float32) if has_bias else None
    d_scale = torch.empty((groups, num_heads), device=dev, dtype=torch.float32)
    dummy = lse
    launcher(_window_attention_v2_bwd_kernel)[(groups, num_heads)](
        qkv, table, scale, qkv_bias.contiguous() if has_bias else qkv, out, grad_out, lse,
        dqkv, d_rel if one_tile else dummy, d_rel_atomic if not one_tile else dummy, d_pad if has_bias else dummy,
        d_scale, num_windows, per_program, H, W, nWh, nWw, num_heads,
        N=N, HD=hd, WH=window_size[0], WW=window_size[1], SH=shift_size[0], SW=shift_size[1],
        HAS_BIAS=has_bias, SHIFTED=bool(shift_size[0] or shift_size[1]), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4 if block_n <= 64 else 8, **_dot_flags(qkv.dtype),
    )
    d_bias = d_rel.sum(0) if one_tile else d_rel_atomic  # (nH, N, N)
    d_table = torch.zeros(table.shape, device=dev, dtype=torch.float32)
    d_table.index_add_(0, relative_position_index.reshape(-1), d_bias.permute(1, 2, 0).reshape(N * N, num_heads))
    d_qkv_bias = None
    if has_bias:
        kv = d_pad.sum(0)  # (nH, 2, hd)
        d_qkv_bias = torch.cat([torch.zeros_like(kv[:, 0]).reshape(-1), kv[:, 0].reshape(-1), kv[:, 1].reshape(-1)])
        d_qkv_bias = d_qkv_bias.to(qkv_bias.dtype)
    return dqkv, d_table.to(table.dtype), d_scale.sum(0).to(scale.dtype), d_qkv_bias
