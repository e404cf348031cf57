"""Triton kernels for Swin (shifted) window attention; semantics in :mod:`vitkernels.reference.window_attention`.

Nothing of the size of qkv is materialised: no rolled, padded or partitioned copy, no per-window bias or mask.
Window coordinates come from :mod:`vitkernels.triton.window_geometry`: window ``w`` covers the shifted, padded
coordinates (r, s) = (wy*wh + iy, wx*ww + ix) of its tokens ``i = iy*ww + ix``; a real position (r < H, s < W) reads
the original NHWC token ((r + roll_h) mod H, (s + roll_w) mod W) of ``qkv``, a padded one the qkv bias (what the qkv
Linear gives a zero-padded input) or zeros. Outputs of real rows are stored at the same original token.

Per (window, head), in fp32: ``S = scale * q k^T + table[rel(i, j), h] + mask(i, j)`` with
``rel(i, j) = (iy_i - iy_j + wh - 1) * (2*ww - 1) + (ix_i - ix_j + ww - 1)`` and ``mask = -100`` between tokens of
different regions of the shifted image (only windows in the last row / column of a shifted axis have two regions,
so only those compare regions); ``P = softmax(S)``, ``O = P v``, and the row log-sum-exp ``lse`` when a backward
will need it. The exponentials are ``exp2`` of log2-scaled logits (``scale * log2 e`` and ``log2 e * bias``).

The bias. Once per call, ``_window_attention_bias_kernel`` writes the (nH, NP, NP) fp32 matrix
``log2(e) * table[rel(i, j), h]`` (-inf past the last key, NP = N rounded up to 64): O(nH N^2) like timm's
per-forward bias, and the attention kernels read contiguous tiles of it instead of a per-element index gather.

Tiling (every choice from :func:`launch_table`). A program handles one head and one query tile of ``BLOCK_M`` rows
for a group of windows (heads on the fastest-varying program id, so programs running side by side read the same
qkv rows); windows of up to 64 tokens are one query tile and one key chunk, and the program's bias tile is loaded
once, before the loop over its windows.

* forward ``_window_attention_fwd_kernel``: online softmax over key chunks of ``KEY_CHUNK`` (32 for large windows:
  144 keys -> 160, not 256), a loop with a run-time bound so that one chunk's tiles are live at a time.
* backward ``_window_attention_bwd_kernel`` (per query tile; P recomputed from lse): over up to three static key
  chunks of at most 128 (:func:`key_chunks`: 49 -> 64, 144 -> 128 + 16), ``dP = dO V^T``,
  ``delta = rowsum(dO * O)``, ``dS = P * (dP - delta)``, ``dQ = scale * dS K``, and the sum over the group's windows
  of dS in registers, stored once per program as a (groups, nH, N, N) partial. When the query tile holds the whole
  window (ws 7 and 8) it also computes ``dV = P^T dO``, ``dK = scale * dS^T Q``: the whole backward is one kernel.
  Otherwise it stores delta for
* ``_window_attention_bwd_dkdv_kernel`` (FlashAttention-2 style, per key tile of ``BLOCK_N`` keys): dK and dV of the
  tile accumulate in registers over query tiles of ``BLOCK_M`` rows.
* ``_window_attention_bias_grad_kernel``: ``d_table[r, h]`` = the partials summed over groups, then over the pairs
  (i, j) with ``rel(i, j) = r``, in a fixed order: deterministic (no atomics anywhere).

Padded tokens' dK and dV are summed into the qkv-bias gradient by per-program partials (padded queries have dO = 0).

Swin V2 (:mod:`vitkernels.triton.window_attention_v2`) runs these kernels with the ``COSINE`` constexpr: q and k rows
normalised (F.normalize, eps 1e-12; the dot operands q^, k^ in the storage dtype), ``scale`` replaced by the head's
``tau`` (an (nH,) tensor), dQ / dK through F.normalize's backward (the rows reloaded for it, not held), and d tau as
per-program partials of ``sum dS * q^ k^T`` (fp32 cosines) summed in a fixed order; where one key chunk holds the
window, delta = rowsum(P * dP) (with tau up to 100, delta from the stored half-precision O costs d tau its
accuracy). With COSINE false every cosine branch is compiled out. Its launch table is :func:`launch_table` with
``cosine``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from vitkernels.geometry import WindowGeometry, WindowGeometry3D
from vitkernels.triton import interpreter_active
from vitkernels.triton._launch import (
    GATE_TARGETS,
    SM80,
    Example,
    LaunchConfig,
    Target,
    device_target,
    half_dtype,
    launcher,
    tile_names,
)
from vitkernels.triton.window_geometry import (
    is_boundary_window_3d,
    relative_code,
    window_kernel_args_3d,
    window_origin,
    window_tokens_3d,
)

MAX_TOKENS_PER_WINDOW = 256
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MASK_VALUE = -100.0


# --- device helpers -------------------------------------------------------------------------------------------------

@triton.jit
def _load_tokens(qkv_ptr, pad_ptr, token, real, valid, col, CH, HD: tl.constexpr, PADDED: tl.constexpr,
                 HAS_PAD_VALUES: tl.constexpr):
    """(rows, HD) of one of q / k / v (``col``: its first channel in a qkv row of CH channels): real rows from qkv,
    padded rows the qkv bias (or 0), rows past N 0."""
    d = tl.arange(0, HD)
    if PADDED:
        x = tl.load(qkv_ptr + token[:, None] * CH + col + d[None, :], mask=real[:, None], other=0.0)
        if HAS_PAD_VALUES:
            pad_value = tl.load(pad_ptr + col + d).to(x.dtype)
            x = tl.where((valid & ~real)[:, None], pad_value[None, :], x)
    else:
        x = tl.load(qkv_ptr + token[:, None] * CH + col + d[None, :], mask=valid[:, None], other=0.0)
    return x


@triton.jit
def _normalize_rows(x):
    """F.normalize over the rows of ``x`` (M, HD): fp32 ``x / max(|x|, 1e-12)``, and ``|x|`` (M,)."""
    x = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    return x / tl.maximum(norm, 1e-12)[:, None], norm


@triton.jit
def _load_normalized(qkv_ptr, pad_ptr, token, real, valid, col, CH, HD: tl.constexpr, PADDED: tl.constexpr,
                     HAS_PAD_VALUES: tl.constexpr):
    """(fp32 x^, |x|) of rows loaded as :func:`_load_tokens` does: the cosine backward reloads its q / k rows
    (cache hits) where it needs them in fp32, rather than holding them across its loops."""
    x = _load_tokens(qkv_ptr, pad_ptr, token, real, valid, col, CH, HD, PADDED, HAS_PAD_VALUES)
    return _normalize_rows(x)


@triton.jit
def _normalize_rows_bwd(x_hat, g, norm, tau):
    """Cosine attention: the gradient of rows x from dL/dx^ = tau * g (g = dS k^ for queries, dS^T q^ for keys),
    F.normalize's backward (the norm's gradient passes where |x| >= eps, the clamp's rule)."""
    g = tl.where((norm >= 1e-12)[:, None], g - x_hat * tl.sum(x_hat * g, 1)[:, None], g)
    return g * (tau / tl.maximum(norm, 1e-12))[:, None]


@triton.jit
def _bias_tile(bias_ptr, h, rows, cols, NP: tl.constexpr):
    """Queries ``rows`` x keys ``cols`` of head h's dense (NP, NP) log2-scaled bias (see
    ``_window_attention_bias_kernel``): plain contiguous loads, no masks (every tile lies inside NP x NP)."""
    return tl.load(bias_ptr + (h * NP + rows[:, None]) * NP + cols[None, :])


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_FP32:  # the interpreter computes bf16 / fp16 dots wrongly: fp32 operands there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _logits(q, k, qk_scale, bias, boundary, q_region, k_region, SHIFTED: tl.constexpr, DOT_FP32: tl.constexpr,
            PRECISION: tl.constexpr):
    """log2(e) * (scale q k^T + bias + mask): the bias tile is already log2-scaled, the mask only in boundary
    windows (a uniform branch: the same for every thread of the program)."""
    return _mask(_dot(q, tl.trans(k), DOT_FP32, PRECISION) * qk_scale + bias, boundary, q_region, k_region, SHIFTED)


@triton.jit
def _mask(s, boundary, q_region, k_region, SHIFTED: tl.constexpr):
    """Log2-scaled logits plus the shifted-window mask (-100 between regions) in a boundary window."""
    if SHIFTED:
        if boundary:
            s = tl.where(q_region[:, None] != k_region[None, :], s + (-100.0 * 1.4426950408889634), s)
    return s


@triton.jit
def _fwd_chunk(acc, m, l, q, q_region, qkv_ptr, pad_ptr, bias, boundary, b, r0, s0, h, qk_scale,
               D, H, W, nWd, nWh, nWw, RD, RH, RW, C, CH, KSTART,
               KC: tl.constexpr, FIRST: tl.constexpr, N: tl.constexpr, HD: tl.constexpr, WD: tl.constexpr,
               WH: tl.constexpr, WW: tl.constexpr, SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               PAD_FIRST: tl.constexpr, SHIFTED: tl.constexpr,
               PADDED: tl.constexpr, HAS_PAD_VALUES: tl.constexpr, COSINE: tl.constexpr, DOT_FP32: tl.constexpr,
               PRECISION: tl.constexpr):
    """Fold keys [KSTART, KSTART + KC) into the online softmax state (acc, running max m, running sum l)."""
    cols = KSTART + tl.arange(0, KC)
    k_tok, k_real, k_valid, k_region = window_tokens_3d(
        b, r0, s0, cols, N, D, H, W, nWd, nWh, nWw, RD, RH, RW, WD, WH, WW, SD, SH, SW, PAD_FIRST, SHIFTED)
    k = _load_tokens(qkv_ptr, pad_ptr, k_tok, k_real, k_valid, C + h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
    if COSINE:  # k^ in the storage dtype: the dot's operand, as timm's matmul of F.normalize's output
        k = _normalize_rows(k)[0].to(k.dtype)
    v = _load_tokens(qkv_ptr, pad_ptr, k_tok, k_real, k_valid, 2 * C + h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
    s = _logits(q, k, qk_scale, bias, boundary, q_region, k_region, SHIFTED, DOT_FP32, PRECISION)
    if FIRST:
        m_new = tl.max(s, 1)
        p = tl.exp2(s - m_new[:, None])
        l = tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
    else:
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
    return acc, m_new, l


@triton.jit
def _program_tile(NH, N: tl.constexpr, BLOCK: tl.constexpr):
    """Program id -> (head, tile index, window group): heads vary fastest."""
    pid = tl.program_id(0)
    TILES: tl.constexpr = (N + BLOCK - 1) // BLOCK
    h = pid % NH
    rest = pid // NH
    return h, rest % TILES, (rest // TILES).to(tl.int64)


# --- forward ----------------------------------------------------------------------------------------------------------

@tile_names("KEY_CHUNK", "HOIST_BIAS")
@triton.jit(do_not_specialize=["num_windows", "windows_per_program", "key_end"])
def _window_attention_fwd_kernel(
    qkv_ptr, bias_ptr, pad_ptr, out_ptr, lse_ptr, tau_ptr,
    num_windows, windows_per_program, key_end, D, H, W, nWd, nWh, nWw, RD, RH, RW, NH, qk_scale,
    N: tl.constexpr, NP: tl.constexpr, HD: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PAD_FIRST: tl.constexpr, PADDED: tl.constexpr,
    HAS_PAD_VALUES: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, KEY_CHUNK: tl.constexpr, HOIST_BIAS: tl.constexpr, COSINE: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Keys in chunks of KEY_CHUNK: one chunk when N <= KEY_CHUNK (then, with HOIST_BIAS, the bias tile is built
    once for all the program's windows), else a loop up to ``key_end`` = N rounded up to KEY_CHUNK (a runtime
    bound: the loop is not unrolled, so one chunk's tiles are live at a time); the dense bias is -inf past N.
    COSINE (Swin V2): q and k rows normalised, ``qk_scale`` times the head's ``tau`` (``tau_ptr``: (nH,))."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    h, qt, g = _program_tile(NH, N, BLOCK_M)
    if COSINE:
        qk_scale = qk_scale * tl.load(tau_ptr + h).to(tl.float32)
    SHIFTED: tl.constexpr = (SD > 0) | (SH > 0) | (SW > 0)
    ONE_CHUNK: tl.constexpr = N <= KEY_CHUNK
    C = NH * HD
    CH = 3 * C
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    if ONE_CHUNK and HOIST_BIAS:  # this head's bias tile, built once for every window of the program
        bias0 = _bias_tile(bias_ptr, h, rows, tl.arange(0, KEY_CHUNK), NP)
    first = g * windows_per_program
    for w in range(first, tl.minimum(first + windows_per_program, num_windows)):
        b, r0, s0 = window_origin(w, nWh, nWw, WH, WW)  # b: the plane b * nWd + wz
        boundary = is_boundary_window_3d(b, r0, s0, nWd, nWh, nWw, WD, WH, WW, SD, SH, SW)
        q_tok, q_real, q_valid, q_region = window_tokens_3d(
            b, r0, s0, rows, N, D, H, W, nWd, nWh, nWw, RD, RH, RW, WD, WH, WW, SD, SH, SW, PAD_FIRST, SHIFTED)
        q = _load_tokens(qkv_ptr, pad_ptr, q_tok, q_real, q_valid, h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
        if COSINE:
            q = _normalize_rows(q)[0].to(q.dtype)
        if ONE_CHUNK:
            if not HOIST_BIAS:
                bias0 = _bias_tile(bias_ptr, h, rows, tl.arange(0, KEY_CHUNK), NP)
            acc, m, l = _fwd_chunk(
                q, q, q, q, q_region, qkv_ptr, pad_ptr, bias0, boundary, b, r0, s0, h, qk_scale, D, H, W,
                nWd, nWh, nWw, RD, RH, RW, C, CH, 0, KEY_CHUNK, True, N, HD, WD, WH, WW, SD, SH, SW, PAD_FIRST,
                SHIFTED, PADDED, HAS_PAD_VALUES,
                COSINE, DOT_FP32, PRECISION)
        else:
            acc = tl.zeros((BLOCK_M, HD), tl.float32)
            m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l = tl.zeros((BLOCK_M,), tl.float32)
            for k0 in range(0, key_end, KEY_CHUNK):
                bias = _bias_tile(bias_ptr, h, rows, k0 + tl.arange(0, KEY_CHUNK), NP)
                acc, m, l = _fwd_chunk(
                    acc, m, l, q, q_region, qkv_ptr, pad_ptr, bias, boundary, b, r0, s0, h, qk_scale, D, H,
                    W, nWd, nWh, nWw, RD, RH, RW, C, CH, k0, KEY_CHUNK, False, N, HD, WD, WH, WW, SD, SH, SW,
                    PAD_FIRST, SHIFTED, PADDED,
                    HAS_PAD_VALUES, COSINE, DOT_FP32, PRECISION)
        o = acc / l[:, None]
        tl.store(out_ptr + q_tok[:, None] * C + h * HD + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=q_real[:, None])
        if STORE_LSE:
            tl.store(lse_ptr + (w * NH + h) * N + rows, (m + tl.log2(l)) * 0.6931471805599453, mask=q_valid)


# --- backward ---------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_chunk(dq, d_rel, dpad_k, dpad_v, d_tau, q, do, lse2, delta, q_region, qkv_ptr, pad_ptr, dqkv_ptr, bias,
               boundary, b, r0, s0, h, qk_scale, scale, D, H, W, nWd, nWh, nWw, RD, RH, RW, C, CH,
               drel_ptr, g, NH, rows, accumulate, REL_IN_MEMORY: tl.constexpr, kstart,
               KSTART: tl.constexpr, KC: tl.constexpr, WHOLE_WINDOW: tl.constexpr, N: tl.constexpr,
               HD: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SD: tl.constexpr,
               SH: tl.constexpr, SW: tl.constexpr, PAD_FIRST: tl.constexpr, SHIFTED: tl.constexpr, PADDED:
               tl.constexpr, HAS_PAD_VALUES: tl.constexpr, COSINE: tl.constexpr,
               EXACT_DELTA: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Keys [KSTART, KSTART + KC) of one window for one query tile: dQ += dS K, the bias partial += dS, and with
    the whole window in the tile, dK and dV of these keys (stored) and the padded keys' sums. COSINE: K is k^ (in
    the storage dtype, q is q^), ``scale`` is tau, dK goes through F.normalize's backward, and the rows' d tau
    += rowsum(dS * q^ k^T) from the fp32 cosines (not from dS rounded for the dots: its terms largely cancel).
    EXACT_DELTA (the chunk holds every key): delta = rowsum(P * dP), returned, instead of the given dO . O.
    REL_IN_MEMORY (a chunk of the run-time key loop, keys from ``KSTART + kstart``): the bias partial is not a
    register tile (``d_rel`` is returned as given) but the program's rows of the (groups, nH, N, N) fp32 buffer,
    read (from the program's second window on: ``accumulate``), added to and written back here."""
    cols = KSTART + kstart + tl.arange(0, KC)
    k_tok, k_real, k_valid, k_region = window_tokens_3d(
        b, r0, s0, cols, N, D, H, W, nWd, nWh, nWw, RD, RH, RW, WD, WH, WW, SD, SH, SW, PAD_FIRST, SHIFTED)
    k = _load_tokens(qkv_ptr, pad_ptr, k_tok, k_real, k_valid, C + h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
    if COSINE:
        k = _normalize_rows(k)[0].to(k.dtype)
    v = _load_tokens(qkv_ptr, pad_ptr, k_tok, k_real, k_valid, 2 * C + h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
    if COSINE:
        cos = _dot(q, tl.trans(k), DOT_FP32, PRECISION)
        s = _mask(cos * qk_scale + bias, boundary, q_region, k_region, SHIFTED)
    else:
        s = _logits(q, k, qk_scale, bias, boundary, q_region, k_region, SHIFTED, DOT_FP32, PRECISION)
    p = tl.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
    if EXACT_DELTA:
        delta = tl.sum(p * dp, 1)
    ds = p * (dp - delta[:, None])
    if COSINE:
        d_tau += tl.sum(ds * cos, 1)
    dq += _dot(ds.to(k.dtype), k, DOT_FP32, PRECISION)
    if REL_IN_MEMORY:
        # the program owns these rows of its group's partials: plain loads and stores, no atomics. The barrier
        # orders the previous window's stores before these loads across the CTA's threads (a tile replicated over
        # warps is stored by one of them and loaded by all).
        rel_ptrs = drel_ptr + ((g * NH + h) * N + rows[:, None]) * N + cols[None, :]
        in_window = (rows < N)[:, None] & (cols < N)[None, :]
        tl.debug_barrier()
        prev = tl.where(accumulate, tl.load(rel_ptrs, mask=in_window, other=0.0), 0.0)  # first window: not read yet
        tl.store(rel_ptrs, prev + ds, mask=in_window)
    else:
        d_rel += ds
    if WHOLE_WINDOW:
        d = tl.arange(0, HD)
        dv = _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, PRECISION)
        if COSINE:
            k_hat, k_norm = _load_normalized(qkv_ptr, pad_ptr, k_tok, k_real, k_valid, C + h * HD, CH, HD, PADDED,
                                             HAS_PAD_VALUES)
            dk = _normalize_rows_bwd(k_hat, _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, PRECISION), k_norm, scale)
        else:
            dk = _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, PRECISION) * scale
        k_offs = k_tok[:, None] * CH + h * HD + d[None, :]
        tl.store(dqkv_ptr + k_offs + C, dk.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
        tl.store(dqkv_ptr + k_offs + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
        if HAS_PAD_VALUES:
            is_pad = (k_valid & ~k_real)[:, None]
            dpad_k += tl.sum(tl.where(is_pad, dk, 0.0), 0)
            dpad_v += tl.sum(tl.where(is_pad, dv, 0.0), 0)
    return dq, d_rel, dpad_k, dpad_v, d_tau, delta


@triton.jit
def _store_rel_partial(drel_ptr, d_rel, g, h, NH, rows, KSTART: tl.constexpr, KC: tl.constexpr, N: tl.constexpr):
    cols = KSTART + tl.arange(0, KC)
    tl.store(drel_ptr + ((g * NH + h) * N + rows[:, None]) * N + cols[None, :], d_rel,
             mask=(rows < N)[:, None] & (cols < N)[None, :])


@tile_names("HOIST_BIAS")
@triton.jit(do_not_specialize=["num_windows", "windows_per_program"])
def _window_attention_bwd_kernel(
    qkv_ptr, bias_ptr, pad_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, drel_ptr, dpad_ptr, tau_ptr,
    dtau_ptr,
    num_windows, windows_per_program, D, H, W, nWd, nWh, nWw, RD, RH, RW, NH, qk_scale, scale,
    N: tl.constexpr, NP: tl.constexpr, HD: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PAD_FIRST: tl.constexpr, PADDED: tl.constexpr,
    HAS_PAD_VALUES: tl.constexpr, BLOCK_M: tl.constexpr,
    HOIST_BIAS: tl.constexpr, COSINE: tl.constexpr,
    CHUNK0: tl.constexpr, CHUNK1: tl.constexpr, CHUNK2: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """COSINE (Swin V2): logits ``tau (q^ . k^)`` (``qk_scale`` and ``scale`` times the head's tau); dQ through
    F.normalize's backward, and the program's d tau partial (sum over its windows of dS * q^ k^) stored at
    ``dtau_ptr[(g * tiles + qt) * NH + h]``."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    scale = tl.cast(scale, tl.float32)
    h, qt, g = _program_tile(NH, N, BLOCK_M)
    if COSINE:
        tau = tl.load(tau_ptr + h).to(tl.float32)
        qk_scale = qk_scale * tau
        scale = scale * tau
    d_tau = tl.zeros((BLOCK_M,), tl.float32)  # COSINE: the rows' d tau over the program's windows (else unused)
    # Cosine logits are tau (up to 100) x a cosine: P is peaked, dS = P (dP - delta) a small difference, and delta
    # from the stored half-precision O (dO . O) is off by O's rounding in every row, an error that d tau (a sum
    # of dS) keeps. With every key in one chunk the chunk computes delta = rowsum(P * dP) instead (consistent with
    # its P: what eager softmax's backward does), and stores that one for the dK / dV kernel.
    # Windows of more than 256 tokens (the 3D op; key_chunks): a run-time loop over key chunks of CHUNK0, each adding
    # its dS to the program's rows of the (groups, nH, N, N) buffer (the partials of all N keys in registers beside
    # the chunk tiles spill). The 2D ops keep their partials in registers and store them once at the end.
    LOOP_KEYS: tl.constexpr = N > 256
    EXACT_DELTA: tl.constexpr = COSINE and CHUNK1 == 0 and not LOOP_KEYS
    SHIFTED: tl.constexpr = (SD > 0) | (SH > 0) | (SW > 0)
    WHOLE_WINDOW: tl.constexpr = N <= BLOCK_M
    C = NH * HD
    CH = 3 * C
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    if LOOP_KEYS:
        d_rel0 = 0.0  # a placeholder: _bwd_chunk returns it unchanged
    else:
        d_rel0 = tl.zeros((BLOCK_M, CHUNK0), tl.float32)  # sum over the program's windows of dS
        if CHUNK1 > 0:
            d_rel1 = tl.zeros((BLOCK_M, CHUNK1), tl.float32)
        if CHUNK2 > 0:
            d_rel2 = tl.zeros((BLOCK_M, CHUNK2), tl.float32)
    if HOIST_BIAS:  # built once for all the program's windows
        bias0 = _bias_tile(bias_ptr, h, rows, tl.arange(0, CHUNK0), NP)
        if CHUNK1 > 0:
            bias1 = _bias_tile(bias_ptr, h, rows, CHUNK0 + tl.arange(0, CHUNK1), NP)
        if CHUNK2 > 0:
            bias2 = _bias_tile(bias_ptr, h, rows, CHUNK0 + CHUNK1 + tl.arange(0, CHUNK2), NP)
    dpad_k = tl.zeros((HD,), tl.float32)  # padded keys' dK / dV (the k / v parts of the qkv-bias gradient)
    dpad_v = tl.zeros((HD,), tl.float32)
    first = g * windows_per_program
    for w in range(first, tl.minimum(first + windows_per_program, num_windows)):
        b, r0, s0 = window_origin(w, nWh, nWw, WH, WW)  # b: the plane b * nWd + wz
        boundary = is_boundary_window_3d(b, r0, s0, nWd, nWh, nWw, WD, WH, WW, SD, SH, SW)
        q_tok, q_real, q_valid, q_region = window_tokens_3d(
            b, r0, s0, rows, N, D, H, W, nWd, nWh, nWw, RD, RH, RW, WD, WH, WW, SD, SH, SW, PAD_FIRST, SHIFTED)
        q = _load_tokens(qkv_ptr, pad_ptr, q_tok, q_real, q_valid, h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
        if COSINE:
            q = _normalize_rows(q)[0].to(q.dtype)
        # padded query rows are cropped from the output: their dO is 0
        o_offs = q_tok[:, None] * C + h * HD + d[None, :]
        do = tl.load(dout_ptr + o_offs, mask=q_real[:, None], other=0.0)
        o = tl.load(out_ptr + o_offs, mask=q_real[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        stat = (w * NH + h) * N + rows
        if not WHOLE_WINDOW and not EXACT_DELTA:
            tl.store(delta_ptr + stat, delta, mask=q_valid)
        lse2 = tl.load(lse_ptr + stat, mask=q_valid, other=0.0) * 1.4426950408889634
        if not HOIST_BIAS and not LOOP_KEYS:  # gathered per window (L1 hits): fewer registers held across the loop
            bias0 = _bias_tile(bias_ptr, h, rows, tl.arange(0, CHUNK0), NP)
            if CHUNK1 > 0:
                bias1 = _bias_tile(bias_ptr, h, rows, CHUNK0 + tl.arange(0, CHUNK1), NP)
            if CHUNK2 > 0:
                bias2 = _bias_tile(bias_ptr, h, rows, CHUNK0 + CHUNK1 + tl.arange(0, CHUNK2), NP)
        dq = tl.zeros((BLOCK_M, HD), tl.float32)
        if LOOP_KEYS:
            # a runtime loop over key chunks of CHUNK0 (not unrolled: one chunk's tiles live at a time)
            for kstart in range(0, N, CHUNK0):
                bias_c = _bias_tile(bias_ptr, h, rows, kstart + tl.arange(0, CHUNK0), NP)
                dq, d_rel0, dpad_k, dpad_v, d_tau, delta = _bwd_chunk(
                    dq, d_rel0, dpad_k, dpad_v, d_tau, q, do, lse2, delta, q_region, qkv_ptr, pad_ptr, dqkv_ptr,
                    bias_c, boundary, b, r0, s0, h, qk_scale, scale, D, H, W, nWd, nWh, nWw, RD, RH, RW, C, CH,
                    drel_ptr, g, NH, rows, w > first, True, kstart, 0, CHUNK0, WHOLE_WINDOW, N, HD, WD, WH, WW, SD,
                    SH, SW, PAD_FIRST, SHIFTED, PADDED, HAS_PAD_VALUES, COSINE, EXACT_DELTA, DOT_FP32, PRECISION)
        else:
            dq, d_rel0, dpad_k, dpad_v, d_tau, delta = _bwd_chunk(
                dq, d_rel0, dpad_k, dpad_v, d_tau, q, do, lse2, delta, q_region, qkv_ptr, pad_ptr, dqkv_ptr, bias0,
                boundary, b, r0, s0, h, qk_scale, scale, D, H, W, nWd, nWh, nWw, RD, RH, RW, C, CH, drel_ptr, g, NH,
                rows, w > first, False, 0, 0, CHUNK0, WHOLE_WINDOW, N, HD, WD, WH, WW, SD, SH, SW, PAD_FIRST,
                SHIFTED, PADDED, HAS_PAD_VALUES, COSINE, EXACT_DELTA, DOT_FP32, PRECISION)
            if CHUNK1 > 0:
                dq, d_rel1, dpad_k, dpad_v, d_tau, delta = _bwd_chunk(
                    dq, d_rel1, dpad_k, dpad_v, d_tau, q, do, lse2, delta, q_region, qkv_ptr, pad_ptr, dqkv_ptr,
                    bias1, boundary, b, r0, s0, h, qk_scale, scale, D, H, W, nWd, nWh, nWw, RD, RH, RW, C, CH,
                    drel_ptr, g, NH, rows, w > first, False, 0, CHUNK0, CHUNK1, WHOLE_WINDOW, N, HD, WD, WH, WW,
                    SD, SH, SW, PAD_FIRST, SHIFTED, PADDED, HAS_PAD_VALUES, COSINE, EXACT_DELTA, DOT_FP32, PRECISION)
            if CHUNK2 > 0:
                dq, d_rel2, dpad_k, dpad_v, d_tau, delta = _bwd_chunk(
                    dq, d_rel2, dpad_k, dpad_v, d_tau, q, do, lse2, delta, q_region, qkv_ptr, pad_ptr, dqkv_ptr,
                    bias2, boundary, b, r0, s0, h, qk_scale, scale, D, H, W, nWd, nWh, nWw, RD, RH, RW, C, CH,
                    drel_ptr, g, NH, rows, w > first, False, 0, CHUNK0 + CHUNK1, CHUNK2, WHOLE_WINDOW, N, HD, WD,
                    WH, WW, SD, SH, SW, PAD_FIRST, SHIFTED, PADDED, HAS_PAD_VALUES, COSINE, EXACT_DELTA, DOT_FP32,
                    PRECISION)
        if EXACT_DELTA and not WHOLE_WINDOW:
            tl.store(delta_ptr + stat, delta, mask=q_valid)
        if COSINE:
            q_hat, q_norm = _load_normalized(qkv_ptr, pad_ptr, q_tok, q_real, q_valid, h * HD, CH, HD, PADDED,
                                             HAS_PAD_VALUES)
            dq = _normalize_rows_bwd(q_hat, dq, q_norm, scale)
        else:
            dq = dq * scale
        tl.store(dqkv_ptr + q_tok[:, None] * CH + h * HD + d[None, :], dq.to(dqkv_ptr.dtype.element_ty),
                 mask=q_real[:, None])
    if not LOOP_KEYS:
        _store_rel_partial(drel_ptr, d_rel0, g, h, NH, rows, 0, CHUNK0, N)
        if CHUNK1 > 0:
            _store_rel_partial(drel_ptr, d_rel1, g, h, NH, rows, CHUNK0, CHUNK1, N)
        if CHUNK2 > 0:
            _store_rel_partial(drel_ptr, d_rel2, g, h, NH, rows, CHUNK0 + CHUNK1, CHUNK2, N)
    if WHOLE_WINDOW and HAS_PAD_VALUES:
        tl.store(dpad_ptr + ((g * NH + h) * 2) * HD + d, dpad_k)
        tl.store(dpad_ptr + ((g * NH + h) * 2 + 1) * HD + d, dpad_v)
    if COSINE:
        TILES: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
        tl.store(dtau_ptr + (g * TILES + qt) * NH + h, tl.sum(d_tau, 0))


@triton.jit(do_not_specialize=["num_windows", "windows_per_program", "n_tokens"])
def _window_attention_bwd_dkdv_kernel(
    qkv_ptr, bias_ptr, pad_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, dpad_ptr, tau_ptr,
    num_windows, windows_per_program, n_tokens, D, H, W, nWd, nWh, nWw, RD, RH, RW, NH, qk_scale, scale,
    N: tl.constexpr, NP: tl.constexpr, HD: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PAD_FIRST: tl.constexpr, PADDED: tl.constexpr,
    HAS_PAD_VALUES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    COSINE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of a key tile of BLOCK_N keys for a group of windows, over query tiles of BLOCK_M rows (windows larger
    than one query tile of the dQ kernel). COSINE: q^ and k^ in the dots, dK through F.normalize's backward."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp32 math: torch.compile passes Python floats as fp64
    scale = tl.cast(scale, tl.float32)
    h, kt, g = _program_tile(NH, N, BLOCK_N)
    if COSINE:
        tau = tl.load(tau_ptr + h).to(tl.float32)
        qk_scale = qk_scale * tau
        scale = scale * tau
    SHIFTED: tl.constexpr = (SD > 0) | (SH > 0) | (SW > 0)
    C = NH * HD
    CH = 3 * C
    cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HD)
    dpad_k = tl.zeros((HD,), tl.float32)
    dpad_v = tl.zeros((HD,), tl.float32)
    first = g * windows_per_program
    for w in range(first, tl.minimum(first + windows_per_program, num_windows)):
        b, r0, s0 = window_origin(w, nWh, nWw, WH, WW)  # b: the plane b * nWd + wz
        boundary = is_boundary_window_3d(b, r0, s0, nWd, nWh, nWw, WD, WH, WW, SD, SH, SW)
        k_tok, k_real, k_valid, k_region = window_tokens_3d(
            b, r0, s0, cols, N, D, H, W, nWd, nWh, nWw, RD, RH, RW, WD, WH, WW, SD, SH, SW, PAD_FIRST, SHIFTED)
        k = _load_tokens(qkv_ptr, pad_ptr, k_tok, k_real, k_valid, C + h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
        v = _load_tokens(qkv_ptr, pad_ptr, k_tok, k_real, k_valid, 2 * C + h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
        if COSINE:
            k = _normalize_rows(k)[0].to(k.dtype)
        dk = tl.zeros((BLOCK_N, HD), tl.float32)
        dv = tl.zeros((BLOCK_N, HD), tl.float32)
        for m0 in range(0, n_tokens, BLOCK_M):  # n_tokens = N at run time: a loop, not unrolled
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tok, q_real, q_valid, q_region = window_tokens_3d(
                b, r0, s0, rows, N, D, H, W, nWd, nWh, nWw, RD, RH, RW, WD, WH, WW, SD, SH, SW, PAD_FIRST, SHIFTED)
            q = _load_tokens(qkv_ptr, pad_ptr, q_tok, q_real, q_valid, h * HD, CH, HD, PADDED, HAS_PAD_VALUES)
            if COSINE:
                q = _normalize_rows(q)[0].to(q.dtype)
            do = tl.load(dout_ptr + q_tok[:, None] * C + h * HD + d[None, :], mask=q_real[:, None], other=0.0)
            stat = (w * NH + h) * N + rows
            lse2 = tl.load(lse_ptr + stat, mask=q_valid, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + stat, mask=q_valid, other=0.0)
            bias = _bias_tile(bias_ptr, h, rows, cols, NP)
            s = _logits(q, k, qk_scale, bias, boundary, q_region, k_region, SHIFTED, DOT_FP32, PRECISION)
            p = tl.exp2(s - lse2[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, PRECISION)
            dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, PRECISION)
        if COSINE:
            k_hat, k_norm = _load_normalized(qkv_ptr, pad_ptr, k_tok, k_real, k_valid, C + h * HD, CH, HD, PADDED,
                                             HAS_PAD_VALUES)
            dk = _normalize_rows_bwd(k_hat, dk, k_norm, scale)
        else:
            dk = dk * scale
        k_offs = k_tok[:, None] * CH + h * HD + d[None, :]
        tl.store(dqkv_ptr + k_offs + C, dk.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
        tl.store(dqkv_ptr + k_offs + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
        if HAS_PAD_VALUES:
            is_pad = (k_valid & ~k_real)[:, None]
            dpad_k += tl.sum(tl.where(is_pad, dk, 0.0), 0)
            dpad_v += tl.sum(tl.where(is_pad, dv, 0.0), 0)
    if HAS_PAD_VALUES:
        TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        part = (g * TILES + kt) * NH + h
        tl.store(dpad_ptr + (part * 2) * HD + d, dpad_k)
        tl.store(dpad_ptr + (part * 2 + 1) * HD + d, dpad_v)


@triton.jit
def _window_attention_bias_kernel(
    table_ptr, bias_ptr, NH,
    N: tl.constexpr, NP: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The dense (nH, NP, NP) fp32 bias the attention kernels read tiles of: ``log2(e) * table[rel(i, j), h]`` for
    i, j < N, -inf in the key columns j >= N (no weight), 0 in the query rows i >= N (finite: those rows are
    never stored). Built once per call: O(nH N^2), like timm's per-forward bias, and no per-element index math or
    gather in the attention kernels."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    OFFSET: tl.constexpr = ((WD - 1) * (2 * WH - 1) + WH - 1) * (2 * WW - 1) + WW - 1  # offset (0, 0, 0)
    rel = relative_code(rows, WD, WH, WW)[:, None] - relative_code(cols, WD, WH, WW)[None, :] + OFFSET
    pair = (rows < N)[:, None] & (cols < N)[None, :]
    bias = tl.load(table_ptr + rel * NH + h, mask=pair, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.where((cols < N)[None, :], bias, float("-inf"))
    tl.store(bias_ptr + (h * NP + rows[:, None]) * NP + cols[None, :], bias,
             mask=(rows < NP)[:, None] & (cols < NP)[None, :])


@triton.jit(do_not_specialize=["groups"])
def _window_attention_bias_grad_kernel(
    drel_ptr, dtable_ptr, groups, NH, R,
    N: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """d_table[r, h] = sum over groups (in order), then over the key tokens j of the pair (j + offset(r), j), of the
    (groups, nH, N, N) dS partials; offset(r) = (dz, dy, dx) from r = ((dz + WD-1)(2WH-1) + dy + WH-1)(2WW-1) +
    dx + WW-1 (dz = 0 with WD = 1, the 2D table)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1)
    if WD == 1:
        ryx = r
    else:
        dz = r // ((2 * WH - 1) * (2 * WW - 1)) - (WD - 1)
        ryx = r % ((2 * WH - 1) * (2 * WW - 1))
    dy = ryx // (2 * WW - 1) - (WH - 1)
    dx = ryx % (2 * WW - 1) - (WW - 1)
    j = tl.arange(0, BLOCK_J)
    if WD == 1:
        jyx = j
    else:
        jz = j // (WH * WW)
        jyx = j - jz * (WH * WW)
    jy = jyx // WW
    iy = jy[None, :] + dy[:, None]
    ix = (jyx - jy * WW)[None, :] + dx[:, None]
    pair = (r < R)[:, None] & (j < N)[None, :] & (iy >= 0) & (iy < WH) & (ix >= 0) & (ix < WW)
    i = iy * WW + ix
    if WD > 1:
        iz = jz[None, :] + dz[:, None]
        pair = pair & (iz >= 0) & (iz < WD)
        i += iz * (WH * WW)
    offs = (h * N + i) * N + j[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_J), tl.float32)
    ptrs = drel_ptr + offs
    for _ in range(0, groups):
        acc += tl.load(ptrs, mask=pair, other=0.0)
        ptrs += NH * N * N  # 64-bit pointer arithmetic: no int32 offset overflow over many groups
    tl.store(dtable_ptr + r * NH + h, tl.sum(acc, 1).to(dtable_ptr.dtype.element_ty), mask=r < R)


# --- launch configuration table -------------------------------------------------------------------------------------

def key_chunks(N: int) -> Tuple[int, int, int]:
    """The dQ / bias kernel's key chunks: up to three powers of two of at most 128 (largest first) covering N rounded
    up to 16 (rounded up further when three do not suffice): 49 -> (64, 0, 0), 144 -> (128, 16, 0),
    100 -> (64, 32, 16), 256 -> (128, 128, 0), 240 -> (128, 128, 0).

    Windows of more than 256 tokens (the 3D op's: 7x7x7 = 343, Video Swin's 8x7x7 = 392; up to 512): (32, 0, 0),
    the width of the chunks the kernel then loops over at run time (343 -> 11 chunks, 352 keys), adding each chunk's
    bias partials to the (groups, nH, N, N) buffer as it goes. Unrolled chunks of up to 128 keys with the partials
    of all N keys in registers spill there (ptxas runs out of its 255 registers; at head_dim 16, where every warp
    of the 16-row tile holds the whole tile, it falls back to 32 registers and spills ~12 KB); so do looped chunks
    of 64 or 128 keys at head_dim 16."""
    n = -(-N // 16) * 16
    if n > 256:
        return (32, 0, 0)
    parts = []
    while n >= 128 and len(parts) < 2:
        parts.append(128)
        n -= 128
    while n and bin(n // 16).count("1") > 3 - len(parts):
        n += 16  # too many bits for the slots left: round up
    if n == 128 or (n and len(parts) == 2 and n > 128):
        parts.append(128)
        n = 0
    parts += [1 << bit for bit in range(6, 3, -1) if n & (1 << bit)]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def launch_table(N: int, head_dim: int, dtype: torch.dtype, target: Target,
                 cosine: bool = False) -> Dict[str, LaunchConfig]:
    """Tiles, warps and stages of every window-attention kernel, by kernel name.

    Query tiles give each warp 16 rows (``num_warps = BLOCK_M / 16``: more warps would each need the whole key
    operand in registers); 64-row tiles on 4 warps are one warpgroup (wgmma on sm_90).

    * Windows of up to 64 tokens (ws 7, 8): one query tile and one key chunk; the forward builds its bias tile once
      per program; the whole backward is the one query-tile kernel.
    * Larger windows: the forward loops over key chunks of 32 (144 keys -> 160, not 256); the dQ / bias kernel
      takes 16-row query tiles (up to 256 tokens its bias partials for all N keys stay in registers across windows)
      on 8 warps
      (each warp a slice of the keys); the dK / dV kernel key tiles of 32 with query tiles of 64 (32 for fp32,
      head_dim 128, and head_dim 64 on sm_80). The 3D op's windows of 257 to 512 tokens take the same
      configurations (the dQ kernel then loops over key chunks of 32 at run time, :func:`key_chunks`).
    fp32 products are IEEE fp32 (FMA): no spills at ws 7 / 12, about a second of compile per kernel.

    ``cosine`` (Swin V2, the kernels' COSINE branches: an fp32 cosine tile per key chunk for d tau, row norms):
    windows of 33 to 64 tokens take the two-kernel backward (the one-kernel one spills at ws 8, head_dim 32).
    """
    wide = dtype == torch.float32 or head_dim >= 128 or (head_dim >= 64 and target.capability < (9, 0))
    dkdv = LaunchConfig.of(num_warps=4, BLOCK_N=32, BLOCK_M=32 if wide else 64)
    if N <= 64:
        block = max(16, triton.next_power_of_2(N))
        fwd = LaunchConfig.of(num_warps=block // 16, BLOCK_M=block, KEY_CHUNK=block, HOIST_BIAS=1)
        table = {"_window_attention_fwd_kernel": fwd}
        if not (cosine and block == 64) and (
                (target.capability >= (9, 0) and head_dim <= 64) or head_dim <= 32 or block < 64):
            # the whole backward in one kernel (8 warps for 64 rows: dK, dV, dQ and the bias partials in registers)
            table["_window_attention_bwd_kernel"] = LaunchConfig.of(
                num_warps=8 if block == 64 else block // 16, BLOCK_M=block, HOIST_BIAS=1)
        else:
            # sm_80 (mma.sync: every warp holds its slice of both operands) with head_dim >= 64, and head_dim 128:
            # the one-kernel backward spills; dQ / bias partials over 32-row query tiles and a separate dK / dV
            # kernel do not (so for cosine attention's windows of 64 tokens: its d tau cosine tile)
            table["_window_attention_bwd_kernel"] = (LaunchConfig.of(num_warps=8, BLOCK_M=16, HOIST_BIAS=1) if cosine
                                                     else LaunchConfig.of(num_warps=4, BLOCK_M=32, HOIST_BIAS=1))
            table["_window_attention_bwd_dkdv_kernel"] = dkdv
    else:
        fwd = LaunchConfig.of(num_warps=4, BLOCK_M=64, KEY_CHUNK=32, HOIST_BIAS=0)
        bwd = LaunchConfig.of(num_warps=8, BLOCK_M=16, HOIST_BIAS=0)
        table = {"_window_attention_fwd_kernel": fwd, "_window_attention_bwd_kernel": bwd,
                 "_window_attention_bwd_dkdv_kernel": dkdv}
    table["_window_attention_bias_kernel"] = LaunchConfig.of(num_warps=4, BLOCK_R=16, BLOCK_C=64)
    block_j = max(16, triton.next_power_of_2(N))
    table["_window_attention_bias_grad_kernel"] = LaunchConfig.of(
        num_warps=4, BLOCK_R=max(1, min(16, 4096 // block_j)), BLOCK_J=block_j)
    return table


def shared_memory_bound(kernel: str, constexprs: dict, element_size: int) -> int:
    """An upper bound of the shared memory (bytes) a window-attention kernel takes, from its constexprs: the dot
    operands that pass through shared memory (q / dO tiles, every key chunk's k and v) plus the fp32 layout
    conversions of a score tile and of an output tile. The compile gate checks it against every compiled
    configuration; on GPUs with less shared memory per block than sm_80 the dispatcher refuses a call it exceeds."""
    c, e, hd = constexprs, element_size, constexprs.get("HD", 0)
    if kernel == "_window_attention_fwd_kernel":
        bm, kc = c["BLOCK_M"], c["KEY_CHUNK"]
        return (bm * hd + 2 * kc * hd) * e + (bm * kc + bm * hd) * 4
    if kernel == "_window_attention_bwd_kernel":
        bm, chunks = c["BLOCK_M"], [c["CHUNK0"], c["CHUNK1"], c["CHUNK2"]]
        return (2 * bm * hd + 2 * sum(chunks) * hd) * e + (2 * bm * max(chunks) + bm * hd) * 4
    if kernel == "_window_attention_bwd_dkdv_kernel":
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        return (2 * bn * hd + 2 * bm * hd) * e + (2 * bm * bn + 2 * bn * hd) * 4
    return 16384  # the bias and bias-gradient kernels: a few KB


def shared_memory_needed(N: int, head_dim: int, dtype: torch.dtype, target: Target, cosine: bool = False) -> int:
    """The largest :func:`shared_memory_bound` of the kernels a call launches on ``target``."""
    table = launch_table(N, head_dim, dtype, target, cosine)
    consts = dict(HD=head_dim, **dict(zip(("CHUNK0", "CHUNK1", "CHUNK2"), key_chunks(N))))
    e = torch.empty((), dtype=dtype).element_size()
    return max(shared_memory_bound(name, {**consts, **dict(cfg.tiles)}, e) for name, cfg in table.items())


def supported_reason(head_dim: int, tokens_per_window: int, dtype: torch.dtype,
                     target: Optional[Target] = None, max_tokens: int = MAX_TOKENS_PER_WINDOW) -> Optional[str]:
    """``None`` if the kernels handle this configuration (on ``target``, when given), else why not. ``max_tokens``:
    the op's largest window (the 2D ops 256, the 3D op 512: the range their examples cover).

    On sm_80 / sm_90 every accepted configuration is compiled by the compile gate, which checks that it fits; on a
    GPU with less shared memory per block, a call whose :func:`shared_memory_needed` exceeds it is refused."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} not supported (float16, bfloat16, float32)"
    if tokens_per_window > max_tokens:
        return f"window of {tokens_per_window} tokens > {max_tokens}"
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} must be a power of two in [16, 128]"
    if target is not None and not target.interpreter:
        if target.capability < (8, 0):
            return f"the Triton window-attention kernels need compute capability >= 8.0, got {target.arch}"
        if target.smem_per_block < SM80.smem_per_block:
            need = shared_memory_needed(tokens_per_window, head_dim, dtype, target)
            if need > target.smem_per_block:
                return (f"{str(dtype).replace('torch.', '')} windows of {tokens_per_window} tokens with head_dim "
                        f"{head_dim} may need up to {need} bytes of shared memory per block, {target.arch} has "
                        f"{target.smem_per_block}")
    return None


# (B, H, W, num_heads, head_dim, window, shift): a tiny problem for each class of the table: windows of up to 16,
# 32, 64 tokens (one query tile) and larger ones; the launch table is the same for every case of a class.
_EXAMPLE_CASES = [
    (1, 4, 4, 1, 16, (4, 4), (2, 2)),        # N = 16
    (1, 5, 6, 2, 32, (5, 6), (2, 3)),        # N = 30 -> 32, a non-square window, one window
    # N = 49 -> 64, padded, shifted, 4 windows x 2 heads (one image: the interpreter's time is per program, two took
    # twice as long)
    (1, 9, 10, 2, 16, (7, 7), (3, 3)),
    (1, 9, 9, 1, 16, (9, 9), (4, 4)),        # N = 81 -> 64 + 32 chunks
    (1, 13, 12, 1, 16, (12, 12), (6, 6)),    # N = 144 -> 128 + 16, padded
    (1, 10, 10, 1, 16, (10, 10), (0, 0)),    # N = 100 -> 64 + 32 + 16 chunks
]


def table_examples(op: str = "window_attention", cosine: bool = False) -> List[Example]:
    """Every configuration :func:`launch_table` returns, each with a tiny problem ``(case, dtype)``: for each gate
    target, fp32 and a half dtype, each head_dim class and each window class (also each key-chunk pattern of the dQ
    kernel, so that every code path runs under the interpreter). ``op``, ``cosine``: the op whose examples they
    are and its table (Swin V2's cosine attention, :mod:`vitkernels.triton.window_attention_v2`)."""
    cases = [(window[0] * window[1], lambda hd, c=(B, H, W, nH, window, shift): (*c[:4], hd, *c[4:]))
             for B, H, W, nH, _, window, shift in _EXAMPLE_CASES]
    return examples_of(op, cases, cosine)


def examples_of(op: str, cases: Sequence[Tuple[int, Callable[[int], tuple]]], cosine: bool = False) -> List[Example]:
    """:func:`table_examples` of an op over these kernels: ``cases`` are (tokens per window, head_dim -> the op's
    case tuple); each distinct (target, dtype, key chunks, table) gets the first case and head_dim selecting it."""
    out = []
    seen = set()
    for target in GATE_TARGETS:
        for dtype in (torch.float32, half_dtype(target)):
            for hd in (16, 32, 64, 128):
                for N, case in cases:
                    table = launch_table(N, hd, dtype, target, cosine)
                    key = (target.arch, dtype, key_chunks(N), tuple(sorted(table.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(Example(op, (case(hd), dtype), target, table))
    return out


# --- host launchers -------------------------------------------------------------------------------------------------

def _dot_flags(dtype: torch.dtype) -> dict:
    """The interpreter computes bf16 / fp16 tl.dot wrongly: its dots run on fp32 operands (IEEE). On a GPU fp32
    products are IEEE fp32 (FMA, as eager PyTorch's default matmul precision; on the compile gate these tiles hold
    fewer registers than tf32x3's three tensor-core products and compile in about a second)."""
    if interpreter_active():
        return dict(DOT_FP32=True, PRECISION="ieee")
    return dict(DOT_FP32=False, PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _windows_per_program(num_windows: int, programs_per_group: int, target: Target, waves: int = 8) -> int:
    """Windows each program loops over: enough programs to fill every multiprocessor ``waves`` times, each over as
    many windows as that leaves (its bias tiles are built once for all of them)."""
    groups = max(1, min(num_windows, -(-waves * target.num_sms // programs_per_group)))
    return -(-num_windows // groups)


class _Problem:
    """Geometry and launch configuration of one call."""

    def __init__(self, qkv: torch.Tensor, window_size: Sequence[int], shift_size: Sequence[int], num_heads: int,
                 has_pad_values: bool, cosine: bool, pad_before_shift: bool):
        three_c = qkv.shape[-1]
        if qkv.dim() == 5:  # (B, D, H, W, 3C): the 3D op (vitkernels.triton.window_attention_3d)
            self.g = WindowGeometry3D.of(qkv.shape[0], qkv.shape[1:4], window_size, shift_size, pad_before_shift)
        else:  # (B, H, W, 3C): the 2D layout is the 3D one with D = 1, wd = 1, sd = 0, timm's padding order
            B, H, W, _ = qkv.shape
            self.g = WindowGeometry3D.of_2d(WindowGeometry.of(B, H, W, window_size, shift_size))
        self.num_heads = num_heads
        self.hd = three_c // (3 * num_heads)
        self.N = self.g.tokens_per_window
        self.target = device_target(qkv.device)
        self.table = launch_table(self.N, self.hd, qkv.dtype, self.target, cosine)
        self.runtime, consts = window_kernel_args_3d(self.g)
        self.window = dict(WD=consts["WD"], WH=consts["WH"], WW=consts["WW"])
        # the dense bias is (nH, NP, NP): every query / key tile (and the dQ kernel's key chunks) lies inside it
        self.NP = max(-(-self.N // 64) * 64, sum(key_chunks(self.N)))
        # the dQ kernel's key chunks: its constexprs alone (a compiled launch refuses a keyword it does not have)
        self.chunks = dict(zip(("CHUNK0", "CHUNK1", "CHUNK2"), key_chunks(self.N)))
        self.consts = dict(N=self.N, NP=self.NP, HD=self.hd, **consts, PADDED=self.g.padded,
                           HAS_PAD_VALUES=has_pad_values and self.g.padded, COSINE=cosine, **_dot_flags(qkv.dtype))

    def tiles(self, kernel: str, block: str) -> int:
        return -(-self.N // self.table[kernel][block])

    def dense_bias(self, table: torch.Tensor) -> torch.Tensor:
        """(nH, NP, NP) fp32: log2(e) * the relative position bias, -inf past the last key, 0 past the last query."""
        bias = torch.empty((self.num_heads, self.NP, self.NP), device=table.device, dtype=torch.float32)
        cfg = self.table["_window_attention_bias_kernel"]
        grid = (triton.cdiv(self.NP, cfg["BLOCK_R"]), self.num_heads, triton.cdiv(self.NP, cfg["BLOCK_C"]))
        launcher(_window_attention_bias_kernel)[grid](
            table, bias, self.num_heads, N=self.N, NP=self.NP, **self.window, **cfg.kwargs())
        return bias


def window_attention_fwd(
    qkv: torch.Tensor,
    table: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    scale: float,
    need_lse: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3C) qkv -> ((B, H, W, C) out, (B*nW, nH, N) fp32 row log-sum-exp, or an empty tensor when
    ``need_lse`` is False)."""
    return attention_fwd(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, None, need_lse)


def window_attention_bwd(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients (qkv, table, qkv_bias or None) of :func:`window_attention_fwd`, in the inputs' dtypes."""
    dqkv, d_table, _, d_qkv_bias = attention_bwd(grad_out, qkv, table, qkv_bias, out, lse, window_size, shift_size,
                                                 num_heads, scale, None)
    return dqkv, d_table, d_qkv_bias


# --- the launches, shared with Swin V2 (vitkernels.triton.window_attention_v2) ---------------------------------------

def attention_fwd(
    qkv: torch.Tensor,
    table: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    scale: float,
    tau: Optional[torch.Tensor],
    need_lse: bool,
    pad_before_shift: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward launches: V1's ``scale * q k^T`` logits when ``tau`` is None, else Swin V2's cosine logits
    ``tau[h] * q^ k^^T`` (tau: (nH,), any float dtype; ``scale`` then multiplies them too, 1 for V2). ``qkv``
    (B, H, W, 3C) with 2D window / shift, or (B, D, H, W, 3C) with 3D ones and ``pad_before_shift`` (the 3D op)."""
    qkv = qkv.contiguous()
    table = table.contiguous()
    cosine = tau is not None
    pb = _Problem(qkv, window_size, shift_size, num_heads, qkv_bias is not None, cosine, pad_before_shift)
    nW = pb.g.num_windows
    out = torch.empty((*qkv.shape[:-1], num_heads * pb.hd), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((nW, num_heads, pb.N) if need_lse else (0,), device=qkv.device, dtype=torch.float32)
    if nW == 0:
        return out, lse
    cfg = pb.table["_window_attention_fwd_kernel"]
    per_group = num_heads * pb.tiles("_window_attention_fwd_kernel", "BLOCK_M")
    wpp = _windows_per_program(nW, per_group, pb.target)
    pad = qkv_bias.contiguous() if qkv_bias is not None else qkv
    tau_arg = tau.contiguous() if cosine else qkv  # V1: never read
    key_end = -(-pb.N // cfg["KEY_CHUNK"]) * cfg["KEY_CHUNK"]
    launcher(_window_attention_fwd_kernel)[(per_group * -(-nW // wpp),)](
        qkv, pb.dense_bias(table), pad, out, lse, tau_arg, nW, wpp, key_end, *pb.runtime, num_heads, scale * LOG2E,
        **pb.consts, STORE_LSE=need_lse, **cfg.kwargs(),
    )
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    scale: float,
    tau: Optional[torch.Tensor],
    pad_before_shift: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients (qkv, table, tau or None, qkv_bias or None) of :func:`attention_fwd`, in the inputs' dtypes."""
    qkv = qkv.contiguous()
    table = table.contiguous()
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    has_bias = qkv_bias is not None
    cosine = tau is not None
    pb = _Problem(qkv, window_size, shift_size, num_heads, has_bias, cosine, pad_before_shift)
    nW, N, hd, dev = pb.g.num_windows, pb.N, pb.hd, qkv.device
    f32 = dict(device=dev, dtype=torch.float32)
    # Real tokens' q, k and v rows are all written by the kernels (each token sits in exactly one window).
    dqkv = torch.empty_like(qkv)
    d_table = torch.empty(table.shape, device=dev, dtype=table.dtype)
    if nW == 0:
        return (dqkv, d_table.zero_(), torch.zeros_like(tau) if cosine else None,
                torch.zeros_like(qkv_bias) if has_bias else None)
    common = (nW,)
    runtime = (*pb.runtime, num_heads, scale * LOG2E, scale)
    tau_arg = tau.contiguous() if cosine else qkv  # V1: never read

    # dQ, the bias partials (and dK, dV when a query tile holds the window)
    cfg = pb.table["_window_attention_bwd_kernel"]
    q_tiles = pb.tiles("_window_attention_bwd_kernel", "BLOCK_M")
    # two waves of programs: each loops over many windows, so the (groups, nH, N, N) partials stay small (the
    # bias-gradient kernel reads them all)
    wpp = _windows_per_program(nW, num_heads * q_tiles, pb.target, waves=2)
    groups = -(-nW // wpp)
    whole_window = q_tiles == 1
    d_rel = torch.empty((groups, num_heads, N, N), **f32)
    delta = lse if whole_window else torch.empty((nW, num_heads, N), **f32)
    d_pad = torch.empty((groups, num_heads, 2, hd) if has_bias and whole_window else (1,), **f32)
    d_tau = torch.empty((groups * q_tiles, num_heads) if cosine else (1,), **f32)  # per-program partials
    pad = qkv_bias.contiguous() if has_bias else qkv
    bias = pb.dense_bias(table)
    launcher(_window_attention_bwd_kernel)[(num_heads * q_tiles * groups,)](
        qkv, bias, pad, out, grad_out, lse, delta, dqkv, d_rel, d_pad, tau_arg, d_tau, *common, wpp, *runtime,
        **pb.consts, **pb.chunks, **cfg.kwargs(),
    )
    if not whole_window:
        cfg = pb.table["_window_attention_bwd_dkdv_kernel"]
        k_tiles = pb.tiles("_window_attention_bwd_dkdv_kernel", "BLOCK_N")
        wpp_kv = _windows_per_program(nW, num_heads * k_tiles, pb.target)
        groups_kv = -(-nW // wpp_kv)
        d_pad = torch.empty((groups_kv * k_tiles, num_heads, 2, hd) if has_bias else (1,), **f32)
        launcher(_window_attention_bwd_dkdv_kernel)[(num_heads * k_tiles * groups_kv,)](
            qkv, bias, pad, grad_out, lse, delta, dqkv, d_pad, tau_arg, *common, wpp_kv, N, *runtime,
            **pb.consts, **cfg.kwargs(),
        )
    cfg = pb.table["_window_attention_bias_grad_kernel"]
    R = table.shape[0]
    launcher(_window_attention_bias_grad_kernel)[(triton.cdiv(R, cfg["BLOCK_R"]), num_heads)](
        d_rel, d_table, groups, num_heads, R, N=N, **pb.window, **cfg.kwargs(),
    )
    d_qkv_bias = None
    if has_bias:
        if pb.g.padded:
            kv = d_pad.sum(0)  # (nH, 2, hd), a fixed-order reduction over the programs' partials
            d_qkv_bias = torch.cat([torch.zeros_like(kv[:, 0]).reshape(-1), kv[:, 0].reshape(-1),
                                    kv[:, 1].reshape(-1)]).to(qkv_bias.dtype)
        else:
            d_qkv_bias = torch.zeros_like(qkv_bias)
    d_tau = d_tau.sum(0).to(tau.dtype) if cosine else None  # fixed order, as the other partials
    return dqkv, d_table, d_tau, d_qkv_bias
