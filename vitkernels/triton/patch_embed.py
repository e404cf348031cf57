"""Triton kernels for the fused ViT / DeiT patch embedding (semantics: :mod:`vitkernels.reference.patch_embed`).

Forward: one GEMM ``tokens = A @ W^T`` with ``M = B*L`` rows (patches), ``K = C*ph*pw`` (the flattened Conv2d
weight, (c, py, px) order) and ``N = D``. The A operand is never materialised: each (BLOCK_M x BLOCK_K) tile is
gathered straight from the (B, C, H, W) image by index math (implicit im2col; with ``dynamic_img_pad`` the
out-of-image pixels of the last patch row / column are masked to zero instead of padding a copy). The epilogue adds
the bias and the position embedding in fp32 and stores each row once, at its final place ``b*(P+L) + P + l`` of the
(B, P + L, D) output. A second tiny kernel writes the P prefix rows (prefix token, plus its position embedding when
``no_embed_class`` is False).

Backward, with dY the (B, P + L, D) output gradient and dY_p its patch rows:

* grad_image: ``dA = dY_p @ W`` (M x K), scattered to NCHW by the same index math (patches do not overlap, so
  col2im is a plain store; padded pixels are dropped);
* grad_weight: ``dW = dY_p^T @ A`` (D x K) with A gathered again; the reduction over M = B*L is split over
  ``SPLIT_M`` programs per tile writing fp32 partials that are summed after (deterministic, no atomics);
* bias / pos_embed / prefix gradients are sums over the batch of dY's rows, done by the op (``torch.sum``).

Everything accumulates in fp32. Under the Triton interpreter (CPU) ``tl.dot`` on bf16 is wrong, so the operands are
upcast there (``UPCAST``).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkernels.triton import interpreter_active
from vitkernels.triton._launch import launcher


@triton.jit
def _gather_patch_tile(
    x_ptr, row_off, gy, gx, rk, row_mask, K, H, W, sx_c, sx_h, sx_w,
    PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr,
):
    """A[rows, rk] = x[b, c, gy*PH + py, gx*PW + px] for k = (c*PH + py)*PW + px; zero outside the image."""
    c = rk // (PH * PW)
    r = rk % (PH * PW)
    py = r // PW
    px = r % PW
    col_off = c * sx_c + py * sx_h + px * sx_w
    mask = row_mask[:, None] & (rk < K)[None, :]
    if PAD:
        mask = mask & ((gy * PH)[:, None] + py[None, :] < H) & ((gx * PW)[:, None] + px[None, :] < W)
    return tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0.0)


@triton.jit
def _patch_rows(pid_m, M, L, GW, T, P, sx_b, sx_h, sx_w, PH: tl.constexpr, PW: tl.constexpr, BLOCK_M: tl.constexpr):
    """For the BLOCK_M patch rows of tile ``pid_m``: image offset of each patch's top-left pixel, grid position,
    patch index l, and output row ``b*T + P + l``."""
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = rm // L
    l = rm % L
    gy = l // GW
    gx = l % GW
    row_off = b * sx_b + (gy * PH) * sx_h + (gx * PW) * sx_w
    out_row = b * T + P + l
    return rm, l, gy, gx, row_off, out_row, rm < M


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row tiles at a time, so neighbouring programs share operand tiles in L2."""
    group_size = GROUP_M * num_pid_n
    group = pid // group_size
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % size_m
    pid_n = (pid % group_size) // size_m
    return pid_m, pid_n


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
    M, L, GW, T, P, POS_ROW0, D, K, H, W,
    sx_b, sx_c, sx_h, sx_w,
    PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    rm, l, gy, gx, row_off, out_row, row_mask = _patch_rows(
        pid_m, M, L, GW, T, P, sx_b, sx_h, sx_w, PH, PW, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = rn < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = _gather_patch_tile(x_ptr, row_off, gy, gx, rk, row_mask, K, H, W, sx_c, sx_h, sx_w, PH, PW, PAD)
        # W^T tile: weight is (D, K) row-major
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None], mask=col_mask[None, :] & (rk < K)[:, None],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + (POS_ROW0 + l)[:, None] * D + rn[None, :], mask=mask, other=0.0)
        acc += pos.to(tl.float32)
    tl.store(out_ptr + out_row[:, None] * D + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_prefix_kernel(
    prefix_ptr, pos_ptr, out_ptr, P, T, D, ADD_POS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, i] = prefix[i] (+ pos[i]) for the P prefix rows of every image; one program per (b, i, D block)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // P
    i = row % P
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    v = tl.load(prefix_ptr + i * D + d, mask=mask, other=0.0).to(tl.float32)
    if ADD_POS:
        v += tl.load(pos_ptr + i * D + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * T + i) * D + d, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr,
    M, L, GW, T, P, D, K, H, W,
    sdx_b, sdx_c, sdx_h, sdx_w,
    PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dA = dY_p @ W for a (BLOCK_M patches x BLOCK_K pixels) tile, stored straight into the NCHW image gradient."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm, l, gy, gx, row_off, out_row, row_mask = _patch_rows(
        pid_m, M, L, GW, T, P, sdx_b, sdx_h, sdx_w, PH, PW, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < D
        dy = tl.load(dy_ptr + out_row[:, None] * D + rn[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    c = rk // (PH * PW)
    r = rk % (PH * PW)
    py = r // PW
    px = r % PW
    mask = row_mask[:, None] & k_mask[None, :]
    if PAD:
        mask = mask & ((gy * PH)[:, None] + py[None, :] < H) & ((gx * PW)[:, None] + px[None, :] < W)
    col_off = c * sdx_c + py * sdx_h + px * sdx_w
    tl.store(dx_ptr + row_off[:, None] + col_off[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_bwd_weight_kernel(
    dy_ptr, x_ptr, dw_ptr,
    M, L, GW, T, P, D, K, H, W, ROWS_PER_SPLIT,
    sx_b, sx_c, sx_h, sx_w,
    PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial dW[split] = dY_p[rows of split]^T @ A[rows of split] for one (BLOCK_N x BLOCK_K) tile, fp32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < D
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    first_tile = split * (ROWS_PER_SPLIT // BLOCK_M)
    for t in range(0, ROWS_PER_SPLIT // BLOCK_M):
        rm, l, gy, gx, row_off, out_row, row_mask = _patch_rows(
            first_tile + t, M, L, GW, T, P, sx_b, sx_h, sx_w, PH, PW, BLOCK_M)
        a = _gather_patch_tile(x_ptr, row_off, gy, gx, rk, row_mask, K, H, W, sx_c, sx_h, sx_w, PH, PW, PAD)
        dy = tl.load(dy_ptr + out_row[:, None] * D + rn[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            dy = dy.to(tl.float32)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=PRECISION)
    mask = n_mask[:, None] & (rk < K)[None, :]
    tl.store(dw_ptr + split.to(tl.int64) * D * K + rn[:, None] * K + rk[None, :], acc, mask=mask)


# --- host side ----------------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products use TF32 tensor cores exactly when torch's convolutions would (``cudnn.allow_tf32``)."""
    if dtype == torch.float32 and not interpreter_active() and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _config(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Tile sizes. On a GPU: 128x128 output tiles, K step 64 (32 for fp32, twice the bytes); under the interpreter
    the smallest tiles tl.dot accepts that cover tiny test shapes in few programs (each program costs time)."""
    if interpreter_active():
        return dict(BLOCK_M=32, BLOCK_N=max(16, min(64, triton.next_power_of_2(N))),
                    BLOCK_K=max(16, min(64, triton.next_power_of_2(K))), GROUP_M=4, num_warps=4, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64
    block_n = 128 if N >= 128 else max(16, triton.next_power_of_2(N))
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _geometry(x_shape, patch: Tuple[int, int], dynamic_img_pad: bool):
    B, C, H, W = x_shape
    ph, pw = patch
    if dynamic_img_pad:
        gh, gw = -(-H // ph), -(-W // pw)
    else:
        gh, gw = H // ph, W // pw
    pad = dynamic_img_pad and (H % ph != 0 or W % pw != 0)
    return gh, gw, pad


def patch_embed_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos: Optional[torch.Tensor],
    prefix: Optional[torch.Tensor],
    no_embed_class: bool,
    dynamic_img_pad: bool,
) -> torch.Tensor:
    """(B, C, H, W) image -> (B, P + L, D) tokens; ``pos`` (N, D) and ``prefix`` (P, D) already 2-D (or None).

    ``x`` may have any strides (a cropped view, channels_last): the gather reads it in place.
    """
    B, C, H, W = x.shape
    D = weight.shape[0]
    ph, pw = weight.shape[2], weight.shape[3]
    gh, gw, pad = _geometry(x.shape, (ph, pw), dynamic_img_pad)
    L = gh * gw
    P = 0 if prefix is None else prefix.shape[0]
    T = P + L
    out = torch.empty((B, T, D), device=x.device, dtype=x.dtype)
    if B == 0:
        return out
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    pos = pos.contiguous() if pos is not None else None
    M, K = B * L, C * ph * pw
    cfg = _config(M, D, K, x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]),)
    launcher(_patch_embed_fwd_kernel)[grid](
        x, weight, bias if bias is not None else weight, pos if pos is not None else weight, out,
        M, L, gw, T, P, 0 if no_embed_class else P, D, K, H, W,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        PH=ph, PW=pw, PAD=pad, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        UPCAST=interpreter_active(), PRECISION=_dot_precision(x.dtype), **cfg,
    )
    if P:
        block_d = min(1024, triton.next_power_of_2(D))
        launcher(_patch_embed_prefix_kernel)[(B * P, triton.cdiv(D, block_d))](
            prefix.contiguous(), pos if pos is not None else weight, out, P, T, D,
            ADD_POS=pos is not None and not no_embed_class, BLOCK_D=block_d,
        )
    return out


def patch_embed_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    num_prefix: int,
    dynamic_img_pad: bool,
    need_input: bool,
    need_weight: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_image (B, C, H, W), grad_weight (D, C, ph, pw)) from ``grad`` (B, P + L, D); an empty tensor in place of
    a gradient that is not needed."""
    B, C, H, W = x.shape
    D, _, ph, pw = weight.shape
    gh, gw, pad = _geometry(x.shape, (ph, pw), dynamic_img_pad)
    L, P = gh * gw, num_prefix
    T = P + L
    M, K = B * L, C * ph * pw
    grad = grad.contiguous()
    upcast, precision = interpreter_active(), _dot_precision(x.dtype)
    cfg = _config(M, D, K, x.dtype)
    grad_x = x.new_empty((0,))
    grad_w = weight.new_empty((0,))
    if need_input:
        grad_x = torch.empty((B, C, H, W), device=x.device, dtype=x.dtype)
        if M:
            w = weight.contiguous()
            # tile over (M, K); the K step of the forward becomes the N step here
            block_k = cfg["BLOCK_N"] if not interpreter_active() else cfg["BLOCK_K"]
            block_n = cfg["BLOCK_K"] if not interpreter_active() else cfg["BLOCK_N"]
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, block_k),)
            launcher(_patch_embed_bwd_input_kernel)[grid](
                grad, w, grad_x, M, L, gw, T, P, D, K, H, W,
                grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3),
                PH=ph, PW=pw, PAD=pad, UPCAST=upcast, PRECISION=precision,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        elif grad_x.numel():
            grad_x.zero_()
    if need_weight:
        if M == 0:
            return grad_x, torch.zeros_like(weight)
        block_m = cfg["BLOCK_M"] if interpreter_active() else 64
        block_n, block_k = (cfg["BLOCK_N"], cfg["BLOCK_K"]) if interpreter_active() else (128, 128 if x.dtype != torch.float32 else 64)
        tiles = triton.cdiv(D, block_n) * triton.cdiv(K, block_k)
        m_tiles = triton.cdiv(M, block_m)
        if interpreter_active():
            split = min(2, m_tiles)  # exercises the split-M reduction on tiny shapes
        else:
            split = max(1, min(m_tiles, (2 * _multiprocessor_count(x.device.index or 0)) // tiles))
        rows_per_split = triton.cdiv(m_tiles, split) * block_m
        split = triton.cdiv(M, rows_per_split)
        partial = torch.empty((split, D, K), device=x.device, dtype=torch.float32)
        launcher(_patch_embed_bwd_weight_kernel)[(triton.cdiv(D, block_n), triton.cdiv(K, block_k), split)](
            grad, x, partial, M, L, gw, T, P, D, K, H, W, rows_per_split,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            PH=ph, PW=pw, PAD=pad, UPCAST=upcast, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        grad_w = (partial[0] if split == 1 else partial.sum(0)).to(weight.dtype).reshape(weight.shape)
    return grad_x, grad_w
