"""Swin window coordinates for Triton kernels: the one place the shift / padding / window-index arithmetic lives.

Conventions: :mod:`vitkernels.geometry` (window ``w = (b * nWh + wy) * nWw + wx``, token ``t = iy * ww + ix``,
shifted padded coordinate ``(r, s) = (wy * wh + iy, wx * ww + ix)``, source token ``((r + RH) mod H, (s + RW) mod W)``
with the rolls ``RH = shift_h mod H``, ``RW = shift_w mod W``). Used by the window partition / reverse kernels and
the window attention kernels (Swin V1 and V2): import the jitted helpers from here.

Host side, :func:`window_kernel_args` gives the runtime arguments ``(H, W, nWh, nWw, RH, RW)`` and the
constexprs ``WH, WW, SH, SW`` in the order the helpers take them. ``0 <= RH < H`` makes every wrap a single
conditional subtraction (no integer division by a runtime size), for any shift, also one larger than the image.
"""
from __future__ import annotations

from typing import Dict, Tuple

import triton
import triton.language as tl

from vitkernels.geometry import WindowGeometry


def window_kernel_args(g: WindowGeometry) -> Tuple[Tuple[int, ...], Dict[str, int]]:
    """((H, W, nWh, nWw, RH, RW), dict(WH, WW, SH, SW)) for the helpers below."""
    return (g.H, g.W, g.nWh, g.nWw, g.roll_h, g.roll_w), dict(WH=g.wh, WW=g.ww, SH=g.shift_h, SW=g.shift_w)


@triton.jit
def window_origin(w, nWh, nWw, WH: tl.constexpr, WW: tl.constexpr):
    """Window ``w`` (a scalar) -> (image b, first shifted row r0, first shifted column s0)."""
    per_image = nWh * nWw
    b = w // per_image
    wi = w - b * per_image
    wy = wi // nWw
    return b, wy * WH, (wi - wy * nWw) * WW


@triton.jit
def source_token(b, r, s, H, W, RH, RW):
    """Flat index ``(b * H + y) * W + x`` of the original token at shifted coordinate (r, s), for r < H, s < W."""
    y = r + RH
    y = tl.where(y >= H, y - H, y)
    x = s + RW
    x = tl.where(x >= W, x - W, x)
    return (b * H + y) * W + x


@triton.jit
def axis_region(r, P, WIN: tl.constexpr, SHIFT: tl.constexpr):
    """Region of coordinate r along an axis of P padded positions for the shifted-window mask: 0 if r < P - WIN,
    1 if r < P - SHIFT, else 2 (timm's three slices)."""
    return tl.where(r < P - WIN, 0, tl.where(r < P - SHIFT, 1, 2))


@triton.jit
def window_tokens(b, r0, s0, idx, N, H, W, nWh, nWw, RH, RW,
                  WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, MASKED: tl.constexpr):
    """Tokens ``idx`` (a vector) of the window at (b, r0, s0): (source token, real: has a source token,
    valid: idx < N, region id for the mask (0 unless MASKED))."""
    iy = idx // WW
    r = r0 + iy
    s = s0 + (idx - iy * WW)
    valid = idx < N
    real = valid & (r < H) & (s < W)
    token = source_token(b, r, s, H, W, RH, RW)
    region = idx * 0
    if MASKED:
        if SH > 0:
            region += 3 * axis_region(r, nWh * WH, WH, SH)
        if SW > 0:
            region += axis_region(s, nWw * WW, WW, SW)
    return token, real, valid, region


@triton.jit
def is_boundary_window(r0, s0, nWh, nWw, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr):
    """Whether the shifted-window mask can be non-zero in the window at (r0, s0): only the last window row / column
    of a shifted axis straddles two regions."""
    last_row = (r0 == (nWh - 1) * WH) & (SH > 0)
    last_col = (s0 == (nWw - 1) * WW) & (SW > 0)
    return last_row | last_col


@triton.jit
def partition_row(tokens, H, W, nWh, nWw, RH, RW, WH: tl.constexpr, WW: tl.constexpr):
    """Original flat tokens (b * H + y) * W + x -> their row in the partitioned (B * nW * N) layout."""
    x = tokens % W
    t = tokens // W
    y = t % H
    b = t // H
    r = y - RH
    r = tl.where(r < 0, r + H, r)
    s = x - RW
    s = tl.where(s < 0, s + W, s)
    wy = r // WH
    wx = s // WW
    return ((b * nWh + wy) * nWw + wx) * (WH * WW) + (r - wy * WH) * WW + (s - wx * WW)


@triton.jit
def relative_code(idx, WW: tl.constexpr):
    """Per-token code such that the relative position index of (i, j) is code_i - code_j + (WH-1)(2WW-1) + WW-1."""
    iy = idx // WW
    return iy * (2 * WW - 1) + (idx - iy * WW)

