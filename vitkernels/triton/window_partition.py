"""Triton kernels for the fused cyclic shift + window partition and its inverse (see
:mod:`vitkernels.reference.window_partition` for the semantics).

Each program moves a (BLOCK_R rows x BLOCK_C channels) tile; the source row of every destination row comes from
the index math of :mod:`vitkernels.triton.window_geometry` (roll, pad and partition folded into the address), so
each element is read and written once.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import triton
import triton.language as tl

from vitkernels.geometry import WindowGeometry
from vitkernels.triton._launch import (
    GATE_TARGETS,
    Example,
    LaunchConfig,
    Target,
    device_target,
    half_dtype,
    launcher,
)
from vitkernels.triton.window_geometry import partition_row, window_kernel_args, window_origin, window_tokens


@triton.jit
def _window_partition_fwd_kernel(
    x_ptr, out_ptr, n_rows, C, H, W, nWh, nWw, RH, RW,
    WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    N: tl.constexpr = WH * WW
    w = rows // N
    b, r0, s0 = window_origin(w, nWh, nWw, WH, WW)
    src, real, _, _ = window_tokens(b, r0, s0, rows - w * N, N, H, W, nWh, nWw, RH, RW, WH, WW, SH, SW, False)
    in_rows = rows < n_rows
    in_cols = cols < C
    vals = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=(in_rows & real)[:, None] & in_cols[None, :],
                   other=0.0)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], vals, mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def _window_reverse_fwd_kernel(
    win_ptr, out_ptr, n_tokens, C, H, W, nWh, nWw, RH, RW,
    WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = partition_row(tokens, H, W, nWh, nWw, RH, RW, WH, WW)
    mask = (tokens < n_tokens)[:, None] & (cols < C)[None, :]
    vals = tl.load(win_ptr + row[:, None] * C + cols[None, :], mask=mask)
    tl.store(out_ptr + tokens[:, None] * C + cols[None, :], vals, mask=mask)


# --- launch configuration table -------------------------------------------------------------------------------------

def launch_table(C: int, dtype: torch.dtype, target: Target) -> Dict[str, LaunchConfig]:
    """Both kernels: (BLOCK_R rows x BLOCK_C channels) tiles of 4096 elements, BLOCK_C = 128 (32 for C <= 32, e.g.
    odd test sizes); 4 warps (a copy: 32 elements per thread, no arithmetic to hide)."""
    block_c = 32 if C <= 32 else 128
    cfg = LaunchConfig.of(num_warps=4, BLOCK_R=4096 // block_c, BLOCK_C=block_c)
    return {"_window_partition_fwd_kernel": cfg, "_window_reverse_fwd_kernel": cfg}


def table_examples() -> List[Example]:
    """Both BLOCK_C classes (the table depends on C only) in fp32 and a half dtype, for every gate target."""
    out = []
    for target in GATE_TARGETS:
        for C, dtype in ((3, torch.float32), (24, half_dtype(target)), (40, torch.float32), (130, half_dtype(target))):
            # (B, H, W, C, window, shift, dtype) with the window larger than the map and a shift past it
            problem = (1, 5, 4, C, (7, 3), (6, 2), dtype)
            out.append(Example("window_partition", problem, target, launch_table(C, dtype, target)))
    return out


# --- host launchers -------------------------------------------------------------------------------------------------

def window_partition(x: torch.Tensor, window_size: Sequence[int], shift_size: Sequence[int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nWh * nWw, wh * ww, C), shift and padding done in the load addressing."""
    x = x.contiguous()
    B, H, W, C = x.shape
    g = WindowGeometry.of(B, H, W, window_size, shift_size)
    out = torch.empty((g.num_windows, g.tokens_per_window, C), device=x.device, dtype=x.dtype)
    n_rows = out.shape[0] * out.shape[1]
    cfg = launch_table(C, x.dtype, device_target(x.device))["_window_partition_fwd_kernel"]
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]), triton.cdiv(C, cfg["BLOCK_C"]))
    args, consts = window_kernel_args(g)
    launcher(_window_partition_fwd_kernel)[grid](x, out, n_rows, C, *args, **consts, **cfg.kwargs())
    return out


def window_reverse(
    windows: torch.Tensor, height: int, width: int, window_size: Sequence[int], shift_size: Sequence[int]
) -> torch.Tensor:
    """(B * nWh * nWw, wh * ww, C) -> (B, height, width, C), crop and roll back done in the load addressing."""
    windows = windows.contiguous()
    C = windows.shape[2]
    g = WindowGeometry.of(1, height, width, window_size, shift_size)
    B = windows.shape[0] // g.windows_per_image
    out = torch.empty((B, height, width, C), device=windows.device, dtype=windows.dtype)
    n_tokens = B * height * width
    cfg = launch_table(C, windows.dtype, device_target(windows.device))["_window_reverse_fwd_kernel"]
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_R"]), triton.cdiv(C, cfg["BLOCK_C"]))
    args, consts = window_kernel_args(g)
    launcher(_window_reverse_fwd_kernel)[grid](windows, out, n_tokens, C, *args, **consts, **cfg.kwargs())
    return out
