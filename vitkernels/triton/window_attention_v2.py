"""Triton kernels for Swin V2 (shifted) window attention: scaled cosine attention with a continuous position bias;
semantics in :mod:`vitkernels.reference.window_attention_v2`.

Everything V1 does by addressing, V2 does with V1's own helpers (imported below, one line to retarget):
``_window_rows`` (window token -> source token, padding, mask region: the shift / partition arithmetic),
``_load_rows`` (a head's q, k or v rows, padded rows = the qkv bias), ``_scores`` (the dot, the bias gathered from
the table by relative position, the mask, -inf past N) and ``_dot``; dot flags, backward grouping and support limits
are V1's too. Nothing is materialised.

Per (window, head), in fp32: ``q^ = q / max(|q|, 1e-12)``, ``k^`` likewise (rows of the head, F.normalize);
``S = tau_h (q^ k^T) + table[rel(i, j), h] + mask(i, j)`` (the dot in the storage dtype as timm's matmul, IEEE fp32
for fp32), ``P = softmax(S)``, ``O = P v``. Queries in tiles of BLOCK_M rows, keys in chunks of BLOCK_N with an
online softmax (flash attention), so a window of 256 tokens never holds more than a (BLOCK_M, BLOCK_N) score tile.
The row log-sum-exp is kept for the backward.

Backward, recomputing P (delta = rowsum(dO * O)): ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)``,
``G = dS k^``, ``d tau_h = sum_i q^_i . G_i``, ``dq = tau (G - q^ (q^ . G)) / |q|`` (``tau G / eps`` where
``|q| < eps``: F.normalize's clamp), and likewise ``dk`` from ``Gk = dS^T q^``. The normalisation needs a row's
whole G, so (as flash attention 2) one kernel owns a key chunk and loops over the query tiles (dK, dV, the padded
tokens' qkv-bias gradient and, for a one-tile window, the table gradient), one owns a query tile and loops over the
key chunks (dQ, d tau), and for windows of several tiles a third owns one (query tile, key chunk) pair of the table
gradient and loops over a group of windows: no atomics, a fixed summation order. Each program handles a group of
windows so the per-program partial sums (table, d tau, qkv bias) stay few; torch adds them.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from vitkernels.triton._launch import launcher
from vitkernels.triton.window_attention import _dot, _dot_flags, _geometry, _load_rows, _scores, _window_groups, _window_rows, supported_reason  # noqa: E501,F401  (V1's helpers: one line to retarget)

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
def _key_chunk(qkv_ptr, bias_ptr, w, cols, h, N, H, W, nWh, nWw, NH, HD: tl.constexpr, WH: tl.constexpr,
               WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Keys ``cols`` of window w, head h: (source token, real, valid, region, k (storage dtype), k^ (fp32),
    |k|, v)."""
    C = NH * HD
    tok, real, valid, region = _window_rows(w, cols, N, H, W, nWh, nWw, WH, WW, SH, SW)
    k = _load_rows(qkv_ptr, bias_ptr, tok, real, valid, C + h * HD, HD, 3 * C, HAS_BIAS)
    v = _load_rows(qkv_ptr, bias_ptr, tok, real, valid, 2 * C + h * HD, HD, 3 * C, HAS_BIAS)
    k_hat, k_norm = _l2_normalize(k)
    return tok, real, valid, region, k, k_hat, k_norm, v


@triton.jit
def _query_tile(qkv_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr, w, rows, h, N, H, W, nWh, nWw, NH,
                HD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """Queries ``rows`` of window w, head h, for the backward: (source token, real, valid, region, q (storage
    dtype), q^ (fp32), |q|, dO (0 for padded rows: cropped from the output), delta = dO . O, lse)."""
    C = NH * HD
    tok, real, valid, region = _window_rows(w, rows, N, H, W, nWh, nWw, WH, WW, SH, SW)
    q = _load_rows(qkv_ptr, bias_ptr, tok, real, valid, h * HD, HD, 3 * C, HAS_BIAS)
    q_hat, q_norm = _l2_normalize(q)
    d = tl.arange(0, HD)
    offs = tok[:, None] * C + h * HD + d[None, :]
    do = tl.load(dout_ptr + offs, mask=real[:, None], other=0.0)
    o = tl.load(out_ptr + offs, mask=real[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(lse_ptr + (w * NH + h) * N + rows, mask=valid, other=0.0)
    return tok, real, valid, region, q, q_hat, q_norm, do, delta, lse


@triton.jit
def _ds_tile(q_hat_s, k_hat_s, v, do, delta, lse, tau, table_ptr, h, NH, rows, cols, q_valid, k_valid, q_region,
             k_region, WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, DOT_FP32: tl.constexpr,
             IEEE: tl.constexpr):
    """(P, dS) of a (query tile, key chunk) pair, P recomputed from the log-sum-exp: dS = P * (dO v^T - delta)."""
    s = _scores(q_hat_s, k_hat_s, tau, table_ptr, h, NH, rows, cols, q_valid, k_valid, q_region, k_region,
                WW, WH, SHIFTED, DOT_FP32, IEEE)
    p = tl.where(q_valid[:, None], tl.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), DOT_FP32, IEEE)
    return p, p * (dp - delta[:, None])


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
    tau = tl.load(scale_ptr + h).to(tl.float32)
    d = tl.arange(0, HD)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q_tok, q_real, q_valid, q_region = _window_rows(w, rows, N, H, W, nWh, nWw, WH, WW, SH, SW)
        q = _load_rows(qkv_ptr, bias_ptr, q_tok, q_real, q_valid, h * HD, HD, 3 * C, HAS_BIAS)
        q_hat, _ = _l2_normalize(q)
        q_hat = q_hat.to(q.dtype)  # the dot's operand in the storage dtype, as timm's matmul
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k_tok, k_real, k_valid, k_region, k, k_hat, _, v = _key_chunk(
                qkv_ptr, bias_ptr, w, cols, h, N, H, W, nWh, nWw, NH, HD, WH, WW, SH, SW, HAS_BIAS)
            s = _scores(q_hat, k_hat.to(k.dtype), tau, table_ptr, h, NH, rows, cols, q_valid, k_valid, q_region,
                        k_region, WW, WH, SHIFTED, DOT_FP32, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, IEEE)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(out_ptr + q_tok[:, None] * C + h * HD + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=q_real[:, None])
        tl.store(lse_ptr + (w * NH + h) * N + rows, m_i + tl.log(l_i), mask=q_valid)


@triton.jit
def _window_attention_v2_bwd_dkdv_kernel(
    qkv_ptr, table_ptr, scale_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr,
    dqkv_ptr, drel_ptr, dpad_ptr,
    num_windows, windows_per_program, H, W, nWh, nWw, NH,
    N: tl.constexpr, HD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_TILE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (window group g, head h, key chunk c): dK, dV of the chunk's keys over the group's windows; the
    padded keys' (dK, dV) sums (the qkv-bias gradient); with ONE_TILE (the window is one tile) the table gradient's
    sum over the group's dS."""
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    c = tl.program_id(2)
    NC = tl.num_programs(2)
    C = NH * HD
    CH = 3 * C
    tau = tl.load(scale_ptr + h).to(tl.float32)
    cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HD)
    d_rel = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    d_pad_k = tl.zeros((HD,), dtype=tl.float32)
    d_pad_v = tl.zeros((HD,), dtype=tl.float32)
    for i in range(0, windows_per_program):
        w = g * windows_per_program + i
        if w < num_windows:
            k_tok, k_real, k_valid, k_region, k, k_hat, k_norm, v = _key_chunk(
                qkv_ptr, bias_ptr, w, cols, h, N, H, W, nWh, nWw, NH, HD, WH, WW, SH, SW, HAS_BIAS)
            k_hat_s = k_hat.to(k.dtype)
            gk = tl.zeros((BLOCK_N, HD), dtype=tl.float32)  # dS^T q^
            dv = tl.zeros((BLOCK_N, HD), dtype=tl.float32)
            for m0 in range(0, N, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                q_tok, q_real, q_valid, q_region, q, q_hat, q_norm, do, delta, lse = _query_tile(
                    qkv_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr, w, rows, h, N, H, W, nWh, nWw, NH, HD, WH, WW,
                    SH, SW, HAS_BIAS)
                q_hat_s = q_hat.to(q.dtype)
                p, ds = _ds_tile(q_hat_s, k_hat_s, v, do, delta, lse, tau, table_ptr, h, NH, rows, cols, q_valid,
                                 k_valid, q_region, k_region, WH, WW, SHIFTED, DOT_FP32, IEEE)
                dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, IEEE)
                gk += _dot(tl.trans(ds.to(q.dtype)), q_hat_s, DOT_FP32, IEEE)
                if ONE_TILE:
                    d_rel += tl.where(q_valid[:, None] & k_valid[None, :], ds, 0.0)
            dk, _ = _l2_normalize_bwd(k_hat, gk, k_norm, tau)
            k_offs = k_tok[:, None] * CH + h * HD + d[None, :]
            tl.store(dqkv_ptr + k_offs + C, dk.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
            tl.store(dqkv_ptr + k_offs + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
            if HAS_BIAS:
                is_pad = (k_valid & ~k_real)[:, None]
                d_pad_k += tl.sum(tl.where(is_pad, dk, 0.0), 0)
                d_pad_v += tl.sum(tl.where(is_pad, dv, 0.0), 0)
    if ONE_TILE:
        rr = tl.arange(0, BLOCK_M)
        tl.store(drel_ptr + ((g * NH + h) * N + rr[:, None]) * N + cols[None, :], d_rel,
                 mask=(rr[:, None] < N) & (cols[None, :] < N))
    if HAS_BIAS:
        base = ((g * NH + h) * NC + c) * 2 * HD
        tl.store(dpad_ptr + base + d, d_pad_k)
        tl.store(dpad_ptr + base + HD + d, d_pad_v)


@triton.jit
def _window_attention_v2_bwd_dq_kernel(
    qkv_ptr, table_ptr, scale_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr,
    dqkv_ptr, dscale_ptr,
    num_windows, windows_per_program, H, W, nWh, nWw, NH,
    N: tl.constexpr, HD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (window group g, head h, query tile r): dQ over the group's windows (G = dS k^ summed over the key
    chunks, then F.normalize's backward) and the group's share of d tau."""
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    r = tl.program_id(2)
    NR = tl.num_programs(2)
    C = NH * HD
    tau = tl.load(scale_ptr + h).to(tl.float32)
    rows = r * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    d_tau = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(0, windows_per_program):
        w = g * windows_per_program + i
        if w < num_windows:
            q_tok, q_real, q_valid, q_region, q, q_hat, q_norm, do, delta, lse = _query_tile(
                qkv_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr, w, rows, h, N, H, W, nWh, nWw, NH, HD, WH, WW, SH,
                SW, HAS_BIAS)
            q_hat_s = q_hat.to(q.dtype)
            gq = tl.zeros((BLOCK_M, HD), dtype=tl.float32)  # dS k^
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                k_tok, k_real, k_valid, k_region, k, k_hat, k_norm, v = _key_chunk(
                    qkv_ptr, bias_ptr, w, cols, h, N, H, W, nWh, nWw, NH, HD, WH, WW, SH, SW, HAS_BIAS)
                k_hat_s = k_hat.to(k.dtype)
                p, ds = _ds_tile(q_hat_s, k_hat_s, v, do, delta, lse, tau, table_ptr, h, NH, rows, cols, q_valid,
                                 k_valid, q_region, k_region, WH, WW, SHIFTED, DOT_FP32, IEEE)
                gq += _dot(ds.to(k.dtype), k_hat_s, DOT_FP32, IEEE)
            dq, qg = _l2_normalize_bwd(q_hat, gq, q_norm, tau)
            d_tau += tl.where(q_valid, qg, 0.0)
            tl.store(dqkv_ptr + q_tok[:, None] * 3 * C + h * HD + d[None, :], dq.to(dqkv_ptr.dtype.element_ty),
                     mask=q_real[:, None])
    tl.store(dscale_ptr + (g * NR + r) * NH + h, tl.sum(d_tau, 0))


@triton.jit
def _window_attention_v2_bwd_rel_kernel(
    qkv_ptr, table_ptr, scale_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr, drel_ptr,
    num_windows, windows_per_program, H, W, nWh, nWw, NH,
    N: tl.constexpr, HD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NC: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (window group g, head h, tile pair (r, c)): the sum over the group's windows of dS[rows r, cols c]
    (the table gradient before its scatter by relative position), for windows larger than one tile."""
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    r = tl.program_id(2) // NC
    c = tl.program_id(2) % NC
    tau = tl.load(scale_ptr + h).to(tl.float32)
    rows = r * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
    d_rel = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, windows_per_program):
        w = g * windows_per_program + i
        if w < num_windows:
            q_tok, q_real, q_valid, q_region, q, q_hat, q_norm, do, delta, lse = _query_tile(
                qkv_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr, w, rows, h, N, H, W, nWh, nWw, NH, HD, WH, WW, SH,
                SW, HAS_BIAS)
            k_tok, k_real, k_valid, k_region, k, k_hat, k_norm, v = _key_chunk(
                qkv_ptr, bias_ptr, w, cols, h, N, H, W, nWh, nWw, NH, HD, WH, WW, SH, SW, HAS_BIAS)
            p, ds = _ds_tile(q_hat.to(q.dtype), k_hat.to(k.dtype), v, do, delta, lse, tau, table_ptr, h, NH, rows,
                             cols, q_valid, k_valid, q_region, k_region, WH, WW, SHIFTED, DOT_FP32, IEEE)
            d_rel += tl.where(q_valid[:, None] & k_valid[None, :], ds, 0.0)
    tl.store(drel_ptr + ((g * NH + h) * N + rows[:, None]) * N + cols[None, :], d_rel,
             mask=(rows[:, None] < N) & (cols[None, :] < N))


# --- host side ------------------------------------------------------------------------------------------------------

def launch_config(N: int, head_dim: int, dtype: torch.dtype) -> Dict[str, int]:
    """The launch-configuration table: query tile (BLOCK_M), key chunk (BLOCK_N), warps and pipeline stages of the
    forward and the backward kernels.

    half dtypes: tiles of at most 64 x 64 (windows of 49 / 64 tokens are one tile, 144 and 256 tokens 3 x 3 and
    4 x 4); fp32 (IEEE dots on CUDA cores, more registers per tile): at most 32 x 32. The sm_90 compile
    (/work/shared/tools/aot_sm90.py on these launches; hd 32 at ws 8, 12, 16, bf16 and fp32) shows no register spills
    with these warps / stages; one pipeline stage for the backward keeps its many live tiles in registers.
    """
    limit = 32 if dtype == torch.float32 else 64
    block = min(limit, max(16, triton.next_power_of_2(N)))
    half = dtype != torch.float32
    return dict(BLOCK_M=block, BLOCK_N=block, fwd_warps=4 if head_dim <= 64 else 8, bwd_warps=8 if half else 4,
                fwd_stages=2, bwd_stages=1)


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
    cfg = launch_config(N, hd, qkv.dtype)
    bias = qkv_bias.contiguous() if qkv_bias is not None else qkv
    launcher(_window_attention_v2_fwd_kernel)[(num_windows, num_heads)](
        qkv, table, scale, bias, out, lse, H, W, nWh, nWw, num_heads,
        N=N, HD=hd, WH=window_size[0], WW=window_size[1], SH=shift_size[0], SW=shift_size[1],
        HAS_BIAS=qkv_bias is not None, SHIFTED=bool(shift_size[0] or shift_size[1]), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"], **_dot_flags(qkv.dtype),
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
    cfg = launch_config(N, hd, qkv.dtype)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    n_rows, n_cols = -(-N // block_m), -(-N // block_n)
    one_tile = n_rows == 1 and n_cols == 1
    # Window groups: enough programs to fill the GPU a few times over, few enough partial sums.
    groups = _window_groups(num_windows, num_heads * n_cols, qkv.device)
    per_program = -(-num_windows // groups)
    groups = -(-num_windows // per_program)
    dev = qkv.device
    dqkv = torch.empty_like(qkv)  # every real token's q, k and v rows are written (each is in one window)
    d_rel = torch.empty((groups, num_heads, N, N), device=dev, dtype=torch.float32)
    has_bias = qkv_bias is not None
    d_pad = torch.empty((groups, num_heads, n_cols, 2, hd), device=dev, dtype=torch.float32) if has_bias else lse
    d_scale = torch.empty((groups, n_rows, num_heads), device=dev, dtype=torch.float32)
    bias = qkv_bias.contiguous() if has_bias else qkv
    common = dict(N=N, HD=hd, WH=window_size[0], WW=window_size[1], SH=shift_size[0], SW=shift_size[1],
                  HAS_BIAS=has_bias, SHIFTED=bool(shift_size[0] or shift_size[1]), BLOCK_M=block_m, BLOCK_N=block_n,
                  num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"], **_dot_flags(qkv.dtype))
    inputs = (qkv, table, scale, bias, out, grad_out, lse)
    sizes = (num_windows, per_program, H, W, nWh, nWw, num_heads)
    launcher(_window_attention_v2_bwd_dkdv_kernel)[(groups, num_heads, n_cols)](
        *inputs, dqkv, d_rel, d_pad, *sizes, ONE_TILE=one_tile, **common)
    launcher(_window_attention_v2_bwd_dq_kernel)[(groups, num_heads, n_rows)](
        *inputs, dqkv, d_scale, *sizes, **common)
    if not one_tile:
        launcher(_window_attention_v2_bwd_rel_kernel)[(groups, num_heads, n_rows * n_cols)](
            *inputs, d_rel, *sizes, NC=n_cols, **common)
    d_table = torch.zeros(table.shape, device=dev, dtype=torch.float32)
    d_table.index_add_(0, relative_position_index.reshape(-1), d_rel.sum(0).permute(1, 2, 0).reshape(N * N, num_heads))
    d_qkv_bias = None
    if has_bias:
        kv = d_pad.sum((0, 2))  # (nH, 2, hd)
        d_qkv_bias = torch.cat([torch.zeros_like(kv[:, 0]).reshape(-1), kv[:, 0].reshape(-1), kv[:, 1].reshape(-1)])
        d_qkv_bias = d_qkv_bias.to(qkv_bias.dtype)
    return dqkv, d_table.to(table.dtype), d_scale.sum((0, 1)).to(scale.dtype), d_qkv_bias
