"""Triton kernels for the fused cyclic shift + window partition and its inverse (see
:mod:`vitkernels.reference.window_partition` for the semantics).

Each program moves a (BLOCK_R rows x BLOCK_C channels) tile; the source row of every destination row comes from
index math (roll, pad and partition folded into the address), so each element is read and written once.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from vitkernels.triton._launch import launcher


@triton.jit
def _window_partition_fwd_kernel(
    x_ptr, out_ptr, n_rows, H, W, C, nWh, nWw,
    WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = rows % (WH * WW)
    w = rows // (WH * WW)
    r = ((w // nWw) % nWh) * WH + t // WW
    s = (w % nWw) * WW + t % WW
    b = w // (nWw * nWh)
    real = (r < H) & (s < W)
    src = ((b * H + (r + SH) % H) * W + (s + SW) % W) * C
    in_rows = rows < n_rows
    in_cols = cols < C
    vals = tl.load(x_ptr + src[:, None] + cols[None, :], mask=(in_rows & real)[:, None] & in_cols[None, :], other=0.0)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], vals, mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def _window_reverse_fwd_kernel(
    win_ptr, out_ptr, n_tokens, H, W, C, nWh, nWw,
    WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x = tokens % W
    y = (tokens // W) % H
    b = tokens // (W * H)
    r = (y + H - SH % H) % H  # the shift may exceed the image (window larger than the map): roll by shift mod H
    s = (x + W - SW % W) % W
    row = ((b * nWh + r // WH) * nWw + s // WW) * (WH * WW) + (r % WH) * WW + s % WW
    mask = (tokens < n_tokens)[:, None] & (cols < C)[None, :]
    vals = tl.load(win_ptr + row[:, None] * C + cols[None, :], mask=mask)
    tl.store(out_ptr + tokens[:, None] * C + cols[None, :], vals, mask=mask)


def _blocks(C: int):
    block_c = min(triton.next_power_of_2(C), 128)
    block_r = max(1, 4096 // block_c)
    return block_r, block_c


def window_partition(x: torch.Tensor, window_size: Sequence[int], shift_size: Sequence[int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nWh * nWw, wh * ww, C), shift and padding done in the load addressing."""
    x = x.contiguous()
    B, H, W, C = x.shape
    wh, ww = window_size
    nWh, nWw = -(-H // wh), -(-W // ww)
    out = torch.empty((B * nWh * nWw, wh * ww, C), device=x.device, dtype=x.dtype)
    n_rows = out.shape[0] * out.shape[1]
    block_r, block_c = _blocks(C)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(C, block_c))
    launcher(_window_partition_fwd_kernel)[grid](
        x, out, n_rows, H, W, C, nWh, nWw,
        WH=wh, WW=ww, SH=shift_size[0], SW=shift_size[1], BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out


def window_reverse(
    windows: torch.Tensor, height: int, width: int, window_size: Sequence[int], shift_size: Sequence[int]
) -> torch.Tensor:
    """(B * nWh * nWw, wh * ww, C) -> (B, height, width, C), crop and roll back done in the load addressing."""
    windows = windows.contiguous()
    wh, ww = window_size
    nWh, nWw = -(-height // wh), -(-width // ww)
    C = windows.shape[2]
    B = windows.shape[0] // (nWh * nWw)
    out = torch.empty((B, height, width, C), device=windows.device, dtype=windows.dtype)
    n_tokens = B * height * width
    block_r, block_c = _blocks(C)
    grid = (triton.cdiv(n_tokens, block_r), triton.cdiv(C, block_c))
    launcher(_window_reverse_fwd_kernel)[grid](
        windows, out, n_tokens, height, width, C, nWh, nWw,
        WH=wh, WW=ww, SH=shift_size[0], SW=shift_size[1], BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out
