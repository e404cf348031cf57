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
  programs per tile (grid axis 2) writing fp32 partials that are summed after (deterministic, no atomics);
* bias / pos_embed / prefix gradients are sums over the batch of dY's rows, done by the op (``torch.sum``).

Everything accumulates in fp32. Under the Triton interpreter (CPU) ``tl.dot`` on bf16 is wrong, so the operands are
upcast there (``UPCAST``).
"""
from __future__ import annotations

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


@triton.jit
def _decode_k(kk, K, PH: tl.constexpr, PW: tl.constexpr):
    """Feature index k = (c*PH + py)*PW + px (the flattened Conv2d weight's column) -> (c, py, px, k, k < K)."""
    c = kk // (PH * PW)
    r = kk % (PH * PW)
    py = r // PW
    px = r % PW
    return c, py, px, kk, kk < K


@triton.jit
def _gather_patch_tile(
    x_ptr, row_off, gy, gx, c, py, px, k_valid, row_mask, H, W, sx_c, sx_h, sx_w,
    PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr,
):
    """A[rows, k] = x[b, c, gy*PH + py, gx*PW + px]; zero outside the image."""
    col_off = c * sx_c + py * sx_h + px * sx_w
    mask = row_mask[:, None] & k_valid[None, :]
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


@tile_names("GROUP_M")
@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
    M, L, GW, T, P, POS_ROW0, D, K, H, W,
    sx_b, sx_c, sx_h, sx_w,
    PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[b, P + l, n] = sum_k A[b*L + l, k] W[n, k] + bias[n] + pos[POS_ROW0 + l, n] for a (BLOCK_M x BLOCK_N) tile;
    A gathered from the image, never stored."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    rm, l, gy, gx, row_off, out_row, row_mask = _patch_rows(
        pid_m, M, L, GW, T, P, sx_b, sx_h, sx_w, PH, PW, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = rn < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c, py, px, k, k_valid = _decode_k(k0 + tl.arange(0, BLOCK_K), K, PH, PW)
        a = _gather_patch_tile(x_ptr, row_off, gy, gx, c, py, px, k_valid, row_mask, H, W, sx_c, sx_h, sx_w,
                               PH, PW, PAD)
        # W^T tile: weight is (D, K) row-major
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + k[:, None], mask=col_mask[None, :] & k_valid[:, None],
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


@tile_names("GROUP_M")
@triton.jit
def _patch_embed_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr,
    M, L, GW, T, P, D, K, H, W,
    sdx_b, sdx_c, sdx_h, sdx_w,
    PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dA = dY_p @ W for a (BLOCK_M patches x BLOCK_K pixels) tile, stored straight into the NCHW image gradient."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm, l, gy, gx, row_off, out_row, row_mask = _patch_rows(
        pid_m, M, L, GW, T, P, sdx_b, sdx_h, sdx_w, PH, PW, BLOCK_M)
    c, py, px, k, k_mask = _decode_k(pid_k * BLOCK_K + tl.arange(0, BLOCK_K), K, PH, PW)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < D
        dy = tl.load(dy_ptr + out_row[:, None] * D + rn[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
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
    PH: tl.constexpr, PW: tl.constexpr, PAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial dW[split] = dY_p[rows of split]^T @ A[rows of split] for one (BLOCK_N x BLOCK_K) tile, fp32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c, py, px, k, k_valid = _decode_k(pid_k * BLOCK_K + tl.arange(0, BLOCK_K), K, PH, PW)
    n_mask = rn < D
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    first_tile = split * (ROWS_PER_SPLIT // BLOCK_M)
    for t in range(0, ROWS_PER_SPLIT // BLOCK_M):
        rm, l, gy, gx, row_off, out_row, row_mask = _patch_rows(
            first_tile + t, M, L, GW, T, P, sx_b, sx_h, sx_w, PH, PW, BLOCK_M)
        a = _gather_patch_tile(x_ptr, row_off, gy, gx, c, py, px, k_valid, row_mask, H, W, sx_c, sx_h, sx_w,
                               PH, PW, PAD)
        dy = tl.load(dy_ptr + out_row[:, None] * D + rn[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            dy = dy.to(tl.float32)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=PRECISION)
    mask = n_mask[:, None] & k_valid[None, :]
    tl.store(dw_ptr + split.to(tl.int64) * D * K + rn[:, None] * K + k[None, :], acc, mask=mask)


# --- host side ----------------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products use TF32 tensor cores exactly when torch's convolutions would (``cudnn.allow_tf32``)."""
    if dtype == torch.float32 and not interpreter_active() and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def launch_table(D: int, dtype: torch.dtype, pad: bool, target: Target) -> Dict[str, LaunchConfig]:
    """Tile sizes and launch options of the patch-embedding kernels, by kernel name (the same on every GPU >= sm_80
    and under the interpreter; ``D`` the embedding width, ``pad`` whether the image is padded).

    128 x 128 output tiles for the forward (64-wide below D = 128) with a K step of 64 (32 for fp32: same bytes
    per stage); 128 patches x 64 pixels for the image gradient (its scattered store needs a pointer per element:
    bigger tiles spill); 128 x 128 weight-gradient tiles with 64 patches per step; half as many patches per tile
    where the image is padded (the extra bounds masks spill registers otherwise)."""
    wide = dtype == torch.float32
    block_n = 128 if D > 64 else 64
    block_m = 64 if pad else 128
    gemm = dict(num_warps=8, num_stages=3)
    return {
        "_patch_embed_fwd_kernel": LaunchConfig.of(**gemm, BLOCK_M=block_m, BLOCK_N=block_n,
                                                   BLOCK_K=32 if wide else 64, GROUP_M=8),
        "_patch_embed_prefix_kernel": LaunchConfig.of(num_warps=4, BLOCK_D=256),
        "_patch_embed_bwd_input_kernel": LaunchConfig.of(**gemm, BLOCK_M=block_m, BLOCK_N=32 if wide else 64,
                                                         BLOCK_K=64, GROUP_M=8),
        "_patch_embed_bwd_weight_kernel": LaunchConfig.of(**gemm, BLOCK_M=32 if wide else 64, BLOCK_N=128,
                                                          BLOCK_K=128),
    }


def table_examples() -> List[Example]:
    """Every configuration of :func:`launch_table` (fp32 / half x padded or not x D above or below 64), each with a
    tiny problem: (B, C, H, W, D, patch, dynamic_img_pad, P, dtype)."""
    out, seen = [], set()
    for target in GATE_TARGETS:
        for dtype in (torch.float32, half_dtype(target)):
            for pad in (False, True):
                for D in (40, 72):
                    # 2 images of 9 x 11 patches of 4 x 6 pixels: 198 rows (two 128-row tiles), padded when asked
                    problem = (2, 2, 36 + 2 * pad, 66 + 3 * pad, D, (4, 6), pad, 1, dtype)
                    table = launch_table(D, dtype, pad, target)
                    key = (target.arch, dtype, tuple(sorted(table.items())))
                    if key not in seen:
                        seen.add(key)
                        out.append(Example("patch_embed", problem, target, table))
    return out


class _Geometry:
    """Sizes shared by the launchers: grid (gh, gw), L, P, T = P + L rows per image, GEMM sizes M, K."""

    def __init__(self, x_shape, weight_shape, num_prefix: int, dynamic_img_pad: bool):
        B, C, H, W = x_shape
        D, _, ph, pw = weight_shape
        self.B, self.C, self.H, self.W, self.D, self.ph, self.pw = B, C, H, W, D, ph, pw
        if dynamic_img_pad:
            self.gh, self.gw = -(-H // ph), -(-W // pw)
        else:
            self.gh, self.gw = H // ph, W // pw
        # mask pixels outside the image only where the padding is real
        self.pad = bool(dynamic_img_pad) and (H % ph != 0 or W % pw != 0)
        self.L = self.gh * self.gw
        self.P = num_prefix
        self.T = self.P + self.L
        self.M = B * self.L
        self.K = C * ph * pw

    def constexprs(self) -> dict:
        return dict(PH=self.ph, PW=self.pw, PAD=self.pad)


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
    g = _Geometry(x.shape, weight.shape, 0 if prefix is None else prefix.shape[0], dynamic_img_pad)
    out = torch.empty((g.B, g.T, g.D), device=x.device, dtype=x.dtype)
    if g.B == 0:
        return out
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    pos = pos.contiguous() if pos is not None else None
    table = launch_table(g.D, x.dtype, g.pad, device_target(x.device))
    cfg = table["_patch_embed_fwd_kernel"]
    grid = (triton.cdiv(g.M, cfg["BLOCK_M"]) * triton.cdiv(g.D, cfg["BLOCK_N"]),)
    launcher(_patch_embed_fwd_kernel)[grid](
        x, weight, bias if bias is not None else weight, pos if pos is not None else weight, out,
        g.M, g.L, g.gw, g.T, g.P, 0 if no_embed_class else g.P, g.D, g.K, g.H, g.W,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        **g.constexprs(), HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        UPCAST=interpreter_active(), PRECISION=_dot_precision(x.dtype), **cfg.kwargs(),
    )
    if g.P:
        cfg = table["_patch_embed_prefix_kernel"]
        launcher(_patch_embed_prefix_kernel)[(g.B * g.P, triton.cdiv(g.D, cfg["BLOCK_D"]))](
            prefix.contiguous(), pos if pos is not None else weight, out, g.P, g.T, g.D,
            ADD_POS=pos is not None and not no_embed_class, **cfg.kwargs(),
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
    g = _Geometry(x.shape, weight.shape, num_prefix, dynamic_img_pad)
    grad = grad.contiguous()
    common = dict(UPCAST=interpreter_active(), PRECISION=_dot_precision(x.dtype), **g.constexprs())
    target = device_target(x.device)
    configs = launch_table(g.D, x.dtype, g.pad, target)
    grad_x = x.new_empty((0,))
    grad_w = weight.new_empty((0,))
    if need_input:
        grad_x = torch.empty((g.B, g.C, g.H, g.W), device=x.device, dtype=x.dtype)
        if g.M:
            cfg = configs["_patch_embed_bwd_input_kernel"]
            grid = (triton.cdiv(g.M, cfg["BLOCK_M"]) * triton.cdiv(g.K, cfg["BLOCK_K"]),)
            launcher(_patch_embed_bwd_input_kernel)[grid](
                grad, weight.contiguous(), grad_x, g.M, g.L, g.gw, g.T, g.P, g.D, g.K, g.H, g.W,
                grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3), **common, **cfg.kwargs(),
            )
    if need_weight:
        if g.M == 0:
            return grad_x, torch.zeros_like(weight)
        cfg = configs["_patch_embed_bwd_weight_kernel"]
        tiles = triton.cdiv(g.D, cfg["BLOCK_N"]) * triton.cdiv(g.K, cfg["BLOCK_K"])
        m_tiles = triton.cdiv(g.M, cfg["BLOCK_M"])
        if target.interpreter:
            split = min(2, m_tiles)  # exercises the split-M reduction on tiny shapes
        else:
            # enough programs for two waves over the SMs; each split sums >= 1 row tile
            split = max(1, min(m_tiles, (2 * target.num_sms) // tiles))
        rows_per_split = triton.cdiv(m_tiles, split) * cfg["BLOCK_M"]
        split = triton.cdiv(g.M, rows_per_split)
        partial = torch.empty((split, g.D, g.K), device=x.device, dtype=torch.float32)
        launcher(_patch_embed_bwd_weight_kernel)[(triton.cdiv(g.D, cfg["BLOCK_N"]), triton.cdiv(g.K, cfg["BLOCK_K"]),
                                                  split)](
            grad, x, partial, g.M, g.L, g.gw, g.T, g.P, g.D, g.K, g.H, g.W, rows_per_split,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3), **common, **cfg.kwargs(),
        )
        grad_w = (partial[0] if split == 1 else partial.sum(0)).to(weight.dtype).reshape(weight.shape)
    return grad_x, grad_w
