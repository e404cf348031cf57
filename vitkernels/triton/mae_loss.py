"""Triton kernels for the MAE loss (semantics: :mod:`vitkernels.reference.mae_loss`).

One program handles BLOCK_P patches, each a row of P = p * p * C values held whole in registers (BLOCK_E >= P):

* the target patch is read straight from the NCHW image by patchify index math (feature e of patch (i, j) is pixel
  (c, i * p + pi, j * p + qi) with e = (pi * p + qi) * C + c), so the patchified copy is never materialised;
* ``norm_pix_loss``: mean and unbiased variance over the row, ``(t - mean) / sqrt(var + 1e-6)``, in registers;
* per-patch mean squared error, weighted by the mask; each program writes its partial numerator and denominator
  (reduced on the host: deterministic, no atomics).

Patches whose mask weight is 0 (the kept ones, 25% in MAE) are not read at all: forward and backward only touch the
pixels and predictions that enter the loss. (Unlike the official ``loss * mask``, a non-finite prediction on a
kept patch therefore does not turn the loss into NaN.)

The backward recomputes the target (cheaper than storing it) and writes
``grad_pred = 2 * grad_loss * mask / (P * sum(mask)) * (pred - target)``, zeros on the kept patches.
Math in fp32 (fp64 when an input is fp64).
"""
from __future__ import annotations

from typing import Dict, List

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
    shape_names,
)

NORM_PIX_EPS = 1e-6
MAX_PATCH_NUMEL = 8192  # one patch row per register tile


@triton.jit
def _upcast(v, F64: tl.constexpr):
    if F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _patch_residual(
    imgs_ptr, pred_ptr, mask_ptr, rows, n_patches, L, grid_w, H, W,
    C: tl.constexpr, p: tl.constexpr, NORM_PIX: tl.constexpr, F64: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """For patch rows ``rows``: (mask weight, active rows, (rows x BLOCK_E) tile mask, pred - target)."""
    in_rows = rows < n_patches
    m = _upcast(tl.load(mask_ptr + rows, mask=in_rows, other=0.0), F64)
    active = in_rows & (m != 0)
    P: tl.constexpr = p * p * C
    e = tl.arange(0, BLOCK_E)
    in_e = e < P
    n = rows // L
    l = rows % L
    i = l // grid_w
    j = l % grid_w
    pi = e // (p * C)  # constexpr divisors: cheap index math
    qi = (e // C) % p
    c = e % C
    pixel = (n * C * H * W + i * p * W + j * p)[:, None] + (c * H * W + pi * W + qi)[None, :]
    tile = active[:, None] & in_e[None, :]
    target = _upcast(tl.load(imgs_ptr + pixel, mask=tile, other=0.0), F64)
    pred = _upcast(tl.load(pred_ptr + (rows * P)[:, None] + e[None, :], mask=tile, other=0.0), F64)
    if NORM_PIX:
        mean = tl.sum(target, axis=1) / P
        centred = tl.where(tile, target - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (P - 1)  # unbiased, as torch.var
        target = centred / tl.sqrt(var + 1e-6)[:, None]
    return m, active, tile, tl.where(tile, pred - target, 0.0)


@shape_names("BLOCK_E")  # the whole patch row: next_power_of_2(P)
@triton.jit
def _mae_loss_fwd_kernel(
    imgs_ptr, pred_ptr, mask_ptr, num_ptr, den_ptr, n_patches, L, grid_w, H, W,
    C: tl.constexpr, p: tl.constexpr, NORM_PIX: tl.constexpr, F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    P: tl.constexpr = p * p * C
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    m, active, tile, diff = _patch_residual(
        imgs_ptr, pred_ptr, mask_ptr, rows, n_patches, L, grid_w, H, W, C, p, NORM_PIX, F64, BLOCK_E
    )
    per_patch = tl.sum(diff * diff, axis=1) / P
    tl.store(num_ptr + pid, tl.sum(tl.where(active, per_patch * m, 0.0), axis=0))
    tl.store(den_ptr + pid, tl.sum(m, axis=0))


@shape_names("BLOCK_E")  # the whole patch row: next_power_of_2(P)
@triton.jit
def _mae_loss_bwd_kernel(
    imgs_ptr, pred_ptr, mask_ptr, scale_ptr, grad_ptr, n_patches, L, grid_w, H, W,
    C: tl.constexpr, p: tl.constexpr, NORM_PIX: tl.constexpr, F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    P: tl.constexpr = p * p * C
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    m, active, tile, diff = _patch_residual(
        imgs_ptr, pred_ptr, mask_ptr, rows, n_patches, L, grid_w, H, W, C, p, NORM_PIX, F64, BLOCK_E
    )
    scale = _upcast(tl.load(scale_ptr), F64)  # 2 * grad_loss / (P * sum(mask)), on the device: no sync
    grad = diff * (scale * m)[:, None]
    e = tl.arange(0, BLOCK_E)
    out_mask = (rows < n_patches)[:, None] & (e < P)[None, :]
    tl.store(grad_ptr + (rows * P)[:, None] + e[None, :], grad.to(grad_ptr.dtype.element_ty), mask=out_mask)


def launch_table(P: int, target: Target) -> Dict[str, LaunchConfig]:
    """Both kernels: a patch row of P = p * p * C values is held whole in a tile of BLOCK_E = next_power_of_2(P)
    lanes (a shape constexpr, not a choice); BLOCK_P patches per program for ~4096 elements (at most 64 patches),
    8 warps for full tiles (the same on every GPU and under the interpreter)."""
    block_e = triton.next_power_of_2(P)
    block_p = max(1, min(64, 4096 // block_e))
    cfg = LaunchConfig.of(num_warps=8 if block_p * block_e >= 4096 else 4, BLOCK_P=block_p)
    return {"_mae_loss_fwd_kernel": cfg, "_mae_loss_bwd_kernel": cfg}


# (C, patch): P = 4, 48, 192, 768, 3072 -> 64 (4 warps), 64, 16, 4 and 1 patches per program
_EXAMPLE_PATCHES = ((1, 2), (3, 4), (3, 8), (3, 16), (3, 32))


def table_examples() -> List[Example]:
    """Every configuration of :func:`launch_table`, each with a tiny problem: (N, C, H, W, patch, norm_pix_loss,
    dtype of the predictions)."""
    out = []
    for target in GATE_TARGETS:
        for dtype in (torch.float32, half_dtype(target)):
            for C, p in _EXAMPLE_PATCHES:
                problem = (2, C, 2 * p, 3 * p, p, True, dtype)
                out.append(Example("mae_loss", problem, target, launch_table(p * p * C, target)))
    return out


def _geometry(imgs: torch.Tensor, patch_size: int):
    N, C, H, W = imgs.shape
    grid_w = W // patch_size
    L = (H // patch_size) * grid_w
    P = patch_size * patch_size * C
    return N, C, H, W, L, grid_w, P, launch_table(P, device_target(imgs.device))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool):
    """Scalar loss in the promoted dtype of (imgs, pred, mask)."""
    imgs, pred, mask = imgs.contiguous(), pred.contiguous(), mask.contiguous()
    N, C, H, W, L, grid_w, P, table = _geometry(imgs, patch_size)
    cfg = table["_mae_loss_fwd_kernel"]
    compute = _compute_dtype(imgs, pred, mask)
    out_dtype = torch.promote_types(torch.promote_types(imgs.dtype, pred.dtype), mask.dtype)
    n_patches = N * L
    n_programs = triton.cdiv(n_patches, cfg["BLOCK_P"])
    num = torch.empty(n_programs, device=pred.device, dtype=compute)
    den = torch.empty(n_programs, device=pred.device, dtype=compute)
    if n_programs > 0:
        launcher(_mae_loss_fwd_kernel)[(n_programs,)](
            imgs, pred, mask, num, den, n_patches, L, grid_w, H, W, C=C, p=patch_size,
            NORM_PIX=norm_pix_loss, F64=compute == torch.float64, BLOCK_E=triton.next_power_of_2(P), **cfg.kwargs(),
        )
    return (num.sum() / den.sum()).to(out_dtype)


def mae_loss_backward(
    grad_loss: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
    norm_pix_loss: bool,
) -> torch.Tensor:
    """d loss / d pred, (N, L, P) in ``pred.dtype``."""
    imgs, pred, mask = imgs.contiguous(), pred.contiguous(), mask.contiguous()
    N, C, H, W, L, grid_w, P, table = _geometry(imgs, patch_size)
    cfg = table["_mae_loss_bwd_kernel"]
    compute = _compute_dtype(imgs, pred, mask)
    scale = (grad_loss.to(compute) * 2 / (P * mask.sum(dtype=compute))).reshape(1)
    grad = torch.empty_like(pred)
    n_patches = N * L
    n_programs = triton.cdiv(n_patches, cfg["BLOCK_P"])
    if n_programs > 0:
        launcher(_mae_loss_bwd_kernel)[(n_programs,)](
            imgs, pred, mask, scale, grad, n_patches, L, grid_w, H, W, C=C, p=patch_size,
            NORM_PIX=norm_pix_loss, F64=compute == torch.float64, BLOCK_E=triton.next_power_of_2(P), **cfg.kwargs(),
        )
    return grad
