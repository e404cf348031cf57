"""Triton kernels for Swin (shifted) window attention; semantics in :mod:`vitkernels.reference.window_attention`.

Nothing is materialised: no rolled, padded or partitioned copy of qkv, no (nH, N, N) bias, no mask tensor.

Addressing. Window ``w`` of image ``b`` covers the padded, shifted coordinates (r, s) = (wy*wh + iy, wx*ww + ix)
for its tokens ``i = iy*ww + ix``. A real position (r < H, s < W) reads token ((r + sh) % H, (s + sw) % W) of the
original NHWC ``qkv``; a padded one reads ``qkv_bias`` (what the qkv Linear gives a zero-padded input) or zeros.
The output of a real row is stored at the same original token, so window reverse and the roll back are free.

Per (window, head), in fp32: ``S = scale * q k^T + table[rel(i, j), h] + mask(i, j)``, with
``rel(i, j) = (iy_i - iy_j + wh - 1) * (2*ww - 1) + (ix_i - ix_j + ww - 1)`` and ``mask = -100`` where the two
tokens lie in different regions of the shifted image (region of r along an axis with shift s > 0: 0 if
r < Hp - wh, 1 if r < Hp - s, else 2; a single region if s == 0); columns past N (the power-of-two padding of the
tile) are -inf. ``P = softmax(S)``, ``O = P v``; the row log-sum-exp is kept for the backward.

Backward, recomputing P from the saved log-sum-exp (delta = rowsum(dO * O)):
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``.
The table gradient is ``d_table[rel, h] = sum over windows and pairs with that rel of dS``: programs loop over a
group of windows and accumulate ``sum_w dS_w`` (N x N) in registers (when the window fits one query tile; larger
windows add each tile into an fp32 buffer with atomics), then torch scatters the (nH, N, N) sum into the table.
Padded tokens' dK and dV are summed the same way into the qkv-bias gradient (padded queries have dO = 0).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from vitkernels.triton import interpreter_active
from vitkernels.triton._launch import launcher

MAX_TOKENS_PER_WINDOW = 256


@triton.jit
def _window_rows(w, idx, N, H, W, nWh, nWw, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr,
                 SW: tl.constexpr):
    """Rows ``idx`` of window ``w``: (flat source token, is a real token, is inside the window, region id)."""
    b = w // (nWh * nWw)
    wi = w % (nWh * nWw)
    r = (wi // nWw) * WH + idx // WW
    s = (wi % nWw) * WW + idx % WW
    valid = idx < N
    real = valid & (r < H) & (s < W)
    token = (b * H + (r + SH) % H) * W + (s + SW) % W
    region = r * 0
    if SH > 0:
        region += 3 * tl.where(r < nWh * WH - WH, 0, tl.where(r < nWh * WH - SH, 1, 2))
    if SW > 0:
        region += tl.where(s < nWw * WW - WW, 0, tl.where(s < nWw * WW - SW, 1, 2))
    return token, real, valid, region


@triton.jit
def _load_rows(qkv_ptr, bias_ptr, token, real, valid, col, HD: tl.constexpr, CH, HAS_BIAS: tl.constexpr):
    """(rows, BLOCK_D) of one of q / k / v: real rows from qkv, padded rows = the qkv bias (or 0).

    ``col`` is the column offset of this head's q, k or v in a qkv row of CH = 3 * C channels.
    """
    d = tl.arange(0, HD)
    x = tl.load(qkv_ptr + token[:, None] * CH + col + d[None, :], mask=real[:, None], other=0.0)
    if HAS_BIAS:
        pad_value = tl.load(bias_ptr + col + d).to(x.dtype)
        x = tl.where((valid & ~real)[:, None], pad_value[None, :], x)
    return x


@triton.jit
def _scores(q, k, scale, table_ptr, h, NH, rows, cols, valid_r, valid_c, region_r, region_c,
            WW: tl.constexpr, WH: tl.constexpr, SHIFTED: tl.constexpr, DOT_FP32: tl.constexpr,
            IEEE: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) logits: scale * q k^T + relative position bias + shifted-window mask."""
    if DOT_FP32:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    rel = (rows[:, None] // WW - cols[None, :] // WW + WH - 1) * (2 * WW - 1) + (rows[:, None] % WW - cols[None, :] % WW + WW - 1)
    pair = valid_r[:, None] & valid_c[None, :]
    s += tl.load(table_ptr + rel * NH + h, mask=pair, other=0.0).to(tl.float32)
    if SHIFTED:
        s += tl.where(region_r[:, None] != region_c[None, :], -100.0, 0.0)
    return tl.where(valid_c[None, :], s, float("-inf"))


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _window_attention_fwd_kernel(
    qkv_ptr, table_ptr, bias_ptr, out_ptr, lse_ptr,
    H, W, nWh, nWw, NH, scale,
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
    d = tl.arange(0, HD)
    for m0 in tl.static_range(0, BLOCK_N, BLOCK_M):
        if m0 < N:
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tok, q_real, q_valid, q_region = _window_rows(w, rows, N, H, W, nWh, nWw, WH, WW, SH, SW)
            q = _load_rows(qkv_ptr, bias_ptr, q_tok, q_real, q_valid, h * HD, HD, CH, HAS_BIAS)
            s = _scores(q, k, scale, table_ptr, h, NH, rows, cols, q_valid, k_valid, q_region, k_region,
                        WW, WH, SHIFTED, DOT_FP32, IEEE)
            row_max = tl.max(s, 1)
            p = tl.exp(s - row_max[:, None])
            denom = tl.sum(p, 1)
            p = p / denom[:, None]
            o = _dot(p.to(v.dtype), v, DOT_FP32, IEEE)
            tl.store(out_ptr + q_tok[:, None] * C + h * HD + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=q_real[:, None])
            tl.store(lse_ptr + (w * NH + h) * N + rows, row_max + tl.log(denom), mask=q_valid)


@triton.jit
def _window_attention_bwd_kernel(
    qkv_ptr, table_ptr, bias_ptr, out_ptr, dout_ptr, lse_ptr,
    dqkv_ptr, dbias_rel_ptr, dbias_rel_atomic_ptr, dqkv_bias_ptr,
    num_windows, windows_per_program, H, W, nWh, nWw, NH, scale,
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
    d_rel = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)  # sum over this group's windows of dS (one tile)
    d_pad_k = tl.zeros((HD,), dtype=tl.float32)  # padded tokens' dK / dV, summed: the qkv-bias gradient
    d_pad_v = tl.zeros((HD,), dtype=tl.float32)
    for i in range(0, windows_per_program):
        w = g * windows_per_program + i
        if w < num_windows:
            k_tok, k_real, k_valid, k_region = _window_rows(w, cols, N, H, W, nWh, nWw, WH, WW, SH, SW)
            k = _load_rows(qkv_ptr, bias_ptr, k_tok, k_real, k_valid, C + h * HD, HD, CH, HAS_BIAS)
            v = _load_rows(qkv_ptr, bias_ptr, k_tok, k_real, k_valid, 2 * C + h * HD, HD, CH, HAS_BIAS)
            dk = tl.zeros((BLOCK_N, HD), dtype=tl.float32)
            dv = tl.zeros((BLOCK_N, HD), dtype=tl.float32)
            for m0 in tl.static_range(0, BLOCK_N, BLOCK_M):
                if m0 < N:
                    rows = m0 + tl.arange(0, BLOCK_M)
                    q_tok, q_real, q_valid, q_region = _window_rows(w, rows, N, H, W, nWh, nWw, WH, WW, SH, SW)
                    q = _load_rows(qkv_ptr, bias_ptr, q_tok, q_real, q_valid, h * HD, HD, CH, HAS_BIAS)
                    # padded query rows are cropped from the output: their dO is 0
                    o_offs = q_tok[:, None] * C + h * HD + d[None, :]
                    do = tl.load(dout_ptr + o_offs, mask=q_real[:, None], other=0.0)
                    o = tl.load(out_ptr + o_offs, mask=q_real[:, None], other=0.0)
                    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                    lse = tl.load(lse_ptr + (w * NH + h) * N + rows, mask=q_valid, other=0.0)
                    s = _scores(q, k, scale, table_ptr, h, NH, rows, cols, q_valid, k_valid, q_region, k_region,
                                WW, WH, SHIFTED, DOT_FP32, IEEE)
                    p = tl.exp(s - lse[:, None])
                    p = tl.where(q_valid[:, None], p, 0.0)
                    dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, IEEE)
                    dp = _dot(do, tl.trans(v), DOT_FP32, IEEE)
                    ds = p * (dp - delta[:, None])
                    dq = _dot(ds.to(k.dtype), k, DOT_FP32, IEEE) * scale
                    tl.store(dqkv_ptr + q_tok[:, None] * CH + h * HD + d[None, :], dq.to(dqkv_ptr.dtype.element_ty),
                             mask=q_real[:, None])
                    dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, IEEE) * scale
                    pair = q_valid[:, None] & k_valid[None, :]
                    if ONE_TILE:
                        d_rel += tl.where(pair, ds, 0.0)
                    else:
                        tl.atomic_add(dbias_rel_atomic_ptr + (h * N + rows[:, None]) * N + cols[None, :], ds, mask=pair)
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


# --- host side ------------------------------------------------------------------------------------------------------

def _geometry(qkv: torch.Tensor, window_size: Sequence[int], num_heads: int):
    B, H, W, three_c = qkv.shape
    wh, ww = window_size
    nWh, nWw = -(-H // wh), -(-W // ww)
    return B, H, W, three_c // (3 * num_heads), nWh, nWw, wh * ww


def _tiles(N: int, head_dim: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N): every key of the window in one tile, queries in tiles of at most 64 rows."""
    block_n = max(16, triton.next_power_of_2(N))
    return min(block_n, 64), block_n


def _dot_flags(dtype: torch.dtype) -> dict:
    # The interpreter computes bf16 tl.dot wrongly: run its dots in fp32. fp32 inputs get IEEE fp32 dots (no TF32),
    # matching eager PyTorch's default matmul precision.
    return dict(DOT_FP32=interpreter_active(), IEEE=dtype == torch.float32)


def supported_reason(head_dim: int, tokens_per_window: int, dtype: torch.dtype) -> Optional[str]:
    """``None`` if the kernels handle this configuration, else why not."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} not supported (float16, bfloat16, float32)"
    if tokens_per_window > MAX_TOKENS_PER_WINDOW:
        return f"window of {tokens_per_window} tokens > {MAX_TOKENS_PER_WINDOW}"
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} must be a power of two in [16, 128]"
    return None


def window_attention_fwd(
    qkv: torch.Tensor,
    table: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3C) qkv -> ((B, H, W, C) out, (B*nW, nH, N) fp32 row log-sum-exp)."""
    qkv = qkv.contiguous()
    table = table.contiguous()
    B, H, W, hd, nWh, nWw, N = _geometry(qkv, window_size, num_heads)
    num_windows = B * nWh * nWw
    out = torch.empty((B, H, W, num_heads * hd), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((num_windows, num_heads, N), device=qkv.device, dtype=torch.float32)
    block_m, block_n = _tiles(N, hd)
    bias = qkv_bias.contiguous() if qkv_bias is not None else qkv
    launcher(_window_attention_fwd_kernel)[(num_windows, num_heads)](
        qkv, table, bias, out, lse, H, W, nWh, nWw, num_heads, scale,
        N=N, HD=hd, WH=window_size[0], WW=window_size[1], SH=shift_size[0], SW=shift_size[1],
        HAS_BIAS=qkv_bias is not None, SHIFTED=bool(shift_size[0] or shift_size[1]), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if block_n <= 64 else 8,
        **_dot_flags(qkv.dtype),
    )
    return out, lse


def _window_groups(num_windows: int, num_heads: int, device: torch.device) -> int:
    """How many programs per head share the windows in the backward: enough to fill the GPU a few times over,
    few enough that their (N x N) partial bias-gradient sums stay small."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(num_windows, -(-target // num_heads)))


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
    relative_position_index: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients (qkv, table, qkv_bias or None) of :func:`window_attention_fwd`, in the inputs' dtypes."""
    qkv = qkv.contiguous()
    table = table.contiguous()
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    B, H, W, hd, nWh, nWw, N = _geometry(qkv, window_size, num_heads)
    num_windows = B * nWh * nWw
    block_m, block_n = _tiles(N, hd)
    groups = _window_groups(num_windows, num_heads, qkv.device)
    per_program = -(-num_windows // groups)
    groups = -(-num_windows // per_program)
    # Real tokens' q, k and v rows are all written by the kernel (each token sits in exactly one window).
    dqkv = torch.empty_like(qkv)
    one_tile = block_m >= block_n
    d_rel = torch.empty((groups, num_heads, N, N), device=qkv.device, dtype=torch.float32) if one_tile else None
    d_rel_atomic = None if one_tile else torch.zeros((num_heads, N, N), device=qkv.device, dtype=torch.float32)
    has_bias = qkv_bias is not None
    d_pad = torch.empty((groups, num_heads, 2, hd), device=qkv.device, dtype=torch.float32) if has_bias else None
    dummy = lse
    launcher(_window_attention_bwd_kernel)[(groups, num_heads)](
        qkv, table, qkv_bias.contiguous() if has_bias else qkv, out, grad_out, lse,
        dqkv, d_rel if one_tile else dummy, d_rel_atomic if not one_tile else dummy, d_pad if has_bias else dummy,
        num_windows, per_program, H, W, nWh, nWw, num_heads, scale,
        N=N, HD=hd, WH=window_size[0], WW=window_size[1], SH=shift_size[0], SW=shift_size[1],
        HAS_BIAS=has_bias, SHIFTED=bool(shift_size[0] or shift_size[1]), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if block_n <= 64 else 8,
        **_dot_flags(qkv.dtype),
    )
    d_bias = d_rel.sum(0) if one_tile else d_rel_atomic  # (nH, N, N)
    d_table = torch.zeros(table.shape, device=table.device, dtype=torch.float32)
    d_table.index_add_(0, relative_position_index.reshape(-1), d_bias.permute(1, 2, 0).reshape(N * N, num_heads))
    d_qkv_bias = None
    if has_bias:
        kv = d_pad.sum(0)  # (nH, 2, hd)
        d_qkv_bias = torch.cat([torch.zeros_like(kv[:, 0]).reshape(-1), kv[:, 0].reshape(-1), kv[:, 1].reshape(-1)])
        d_qkv_bias = d_qkv_bias.to(qkv_bias.dtype)
    return dqkv, d_table.to(table.dtype), d_qkv_bias
