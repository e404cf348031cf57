"""Shifted-window coordinates for Triton kernels: the one place the shift / padding / window-index arithmetic lives.

2D conventions: :mod:`vitkernels.geometry` (window ``w = (b * nWh + wy) * nWw + wx``, token ``t = iy * ww + ix``,
shifted padded coordinate ``(r, s) = (wy * wh + iy, wx * ww + ix)``, source token ``((r + RH) mod H, (s + RW) mod W)``
with the rolls ``RH = shift_h mod H``, ``RW = shift_w mod W``, timm's order: roll, then pad).

3D (:class:`vitkernels.geometry.WindowGeometry3D`, the C++ twin ``csrc/include/vitkernels/window_geometry_3d.h``):
a depth axis in front, window ``w = ((b * nWd + wz) * nWh + wy) * nWw + wx``, token ``t = (iz * wh + iy) * ww + ix``,
frame coordinate ``(z, r, s) = (wz * wd + iz, wy * wh + iy, wx * ww + ix)``, and either padding order per
:func:`axis_source` (``PAD_FIRST``: MONAI / Video Swin pad, then roll, the wrap modulo the padded length). The 2D
layout is the 3D one with ``D = 1, nWd = 1, WD = 1, SD = 0, PAD_FIRST = False``: the 2D helpers below call the 3D
ones with those constants (the depth terms fold away), and the window attention kernels always take the 3D
arguments (with ``D = nWd = 1`` Triton specialises both to constants, with ``WD = 1`` the depth branches are
compiled out: the 2D kernels are what they were).

Host side, :func:`window_kernel_args_3d` gives the runtime arguments ``(D, H, W, nWd, nWh, nWw, RD, RH, RW)`` and the
constexprs ``WD, WH, WW, SD, SH, SW, PAD_FIRST`` in the order the helpers take them (:func:`window_kernel_args`
the 2D ones). ``0 <= roll < length`` (``< padded length`` with ``PAD_FIRST``) makes every wrap a single conditional
subtraction (no integer division by a runtime size), for any shift, also one larger than the image.
"""
from __future__ import annotations

from typing import Dict, Tuple

import triton
import triton.language as tl

from vitkernels.geometry import WindowGeometry, WindowGeometry3D


def window_kernel_args(g: WindowGeometry) -> Tuple[Tuple[int, ...], Dict[str, int]]:
    """((H, W, nWh, nWw, RH, RW), dict(WH, WW, SH, SW)) for the 2D helpers below."""
    return (g.H, g.W, g.nWh, g.nWw, g.roll_h, g.roll_w), dict(WH=g.wh, WW=g.ww, SH=g.shift_h, SW=g.shift_w)


def window_kernel_args_3d(g: WindowGeometry3D) -> Tuple[Tuple[int, ...], Dict[str, int]]:
    """((D, H, W, nWd, nWh, nWw, RD, RH, RW), dict(WD, WH, WW, SD, SH, SW, PAD_FIRST)) for the 3D helpers."""
    d, h, w = g.axes
    return ((d.n, h.n, w.n, d.nW, h.nW, w.nW, d.roll, h.roll, w.roll),
            dict(WD=d.w, WH=h.w, WW=w.w, SD=d.s, SH=h.s, SW=w.s, PAD_FIRST=d.pad_first))


@triton.jit
def window_origin(w, nWh, nWw, WH: tl.constexpr, WW: tl.constexpr):
    """Window ``w`` (a scalar) -> (plane ``b * nWd + wz``, first shifted row r0, first shifted column s0); in a 2D
    layout the plane is the image b. :func:`window_depth` splits a plane of a 3D layout."""
    per_plane = nWh * nWw
    plane = w // per_plane
    wi = w - plane * per_plane
    wy = wi // nWw
    return plane, wy * WH, (wi - wy * nWw) * WW


@triton.jit
def window_depth(plane, nWd, WD: tl.constexpr):
    """Plane ``b * nWd + wz`` (a scalar) -> (volume b, first frame depth z0 = wz * WD)."""
    b = plane // nWd
    return b, (plane - b * nWd) * WD


@triton.jit
def axis_source(p, n, P, R, PAD_FIRST: tl.constexpr):
    """Frame coordinates p (< P, the padded length) along an axis of n positions -> (source coordinate, real).
    PAD_FIRST (pad, then roll by R < P): the source is (p + R) mod P, real if < n; else (roll by R < n, then pad):
    real if p < n, the source (p + R) mod n."""
    if PAD_FIRST:
        src = p + R
        src = tl.where(src >= P, src - P, src)
        real = src < n
    else:
        real = p < n
        src = p + R
        src = tl.where(src >= n, src - n, src)
    return src, real


@triton.jit
def axis_region(r, P, WIN: tl.constexpr, SHIFT: tl.constexpr):
    """Region of coordinate r along an axis of P padded positions for the shifted-window mask: 0 if r < P - WIN,
    1 if r < P - SHIFT, else 2 (timm's / MONAI's three slices)."""
    return tl.where(r < P - WIN, 0, tl.where(r < P - SHIFT, 1, 2))


@triton.jit
def window_tokens_3d(plane, r0, s0, idx, N, D, H, W, nWd, nWh, nWw, RD, RH, RW,
                     WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SD: tl.constexpr, SH: tl.constexpr,
                     SW: tl.constexpr, PAD_FIRST: tl.constexpr, MASKED: tl.constexpr):
    """Tokens ``idx`` (a vector) of the window at (plane, r0, s0) (:func:`window_origin`): (source token
    ``((b * D + z) * H + y) * W + x``, real: has a source token, valid: idx < N, region id for the mask
    (``9 rd + 3 rh + rw``, 0 unless MASKED)). With WD = 1 (2D layouts too) ``b * D + z`` is the plane itself: the
    2D arithmetic, no depth terms."""
    if WD == 1:  # one frame per window: no depth coordinate in the window, no roll or padding along depth
        rest = idx
    else:
        b, z0 = window_depth(plane, nWd, WD)
        iz = idx // (WH * WW)
        rest = idx - iz * (WH * WW)
    iy = rest // WW
    r = r0 + iy
    s = s0 + (rest - iy * WW)
    valid = idx < N
    y, y_real = axis_source(r, H, nWh * WH, RH, PAD_FIRST)
    x, x_real = axis_source(s, W, nWw * WW, RW, PAD_FIRST)
    real = valid & y_real & x_real
    if WD == 1:
        token = (plane * H + y) * W + x
    else:
        z, z_real = axis_source(z0 + iz, D, nWd * WD, RD, PAD_FIRST)
        real = real & z_real
        token = ((b * D + z) * H + y) * W + x
    region = idx * 0
    if MASKED:
        if SD > 0:
            region += 9 * axis_region(z0 + iz, nWd * WD, WD, SD)
        if SH > 0:
            region += 3 * axis_region(r, nWh * WH, WH, SH)
        if SW > 0:
            region += axis_region(s, nWw * WW, WW, SW)
    return token, real, valid, region


@triton.jit
def window_tokens(b, r0, s0, idx, N, H, W, nWh, nWw, RH, RW,
                  WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, MASKED: tl.constexpr):
    """Tokens ``idx`` (a vector) of the window at (b, r0, s0) of a 2D layout: (source token, real: has a source
    token, valid: idx < N, region id for the mask (0 unless MASKED))."""
    return window_tokens_3d(b, r0, s0, idx, N, 1, H, W, 1, nWh, nWw, 0, RH, RW, 1, WH, WW, 0, SH, SW, False,
                            MASKED)


@triton.jit
def is_boundary_window_3d(plane, r0, s0, nWd, nWh, nWw, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                          SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr):
    """Whether the shifted-window mask can be non-zero in the window at (plane, r0, s0): only the last window along
    a shifted axis straddles two regions."""
    last_row = (r0 == (nWh - 1) * WH) & (SH > 0)
    last_col = (s0 == (nWw - 1) * WW) & (SW > 0)
    boundary = last_row | last_col
    if SD > 0:
        z0 = window_depth(plane, nWd, WD)[1]
        boundary = boundary | (z0 == (nWd - 1) * WD)
    return boundary


@triton.jit
def is_boundary_window(r0, s0, nWh, nWw, WH: tl.constexpr, WW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr):
    """:func:`is_boundary_window_3d` of a 2D layout."""
    return is_boundary_window_3d(0, r0, s0, 1, nWh, nWw, 1, WH, WW, 0, SH, SW)  # plane unused without SD


@triton.jit
def partition_row(tokens, H, W, nWh, nWw, RH, RW, WH: tl.constexpr, WW: tl.constexpr):
    """Original flat tokens (b * H + y) * W + x -> their row in the partitioned (B * nW * N) layout (2D)."""
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
def relative_code(idx, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr):
    """Per-token code such that the relative position index of (i, j) is ``code_i - code_j + relative_offset``
    (MONAI / Video Swin's ``(dz + wd-1)(2wh-1)(2ww-1) + (dy + wh-1)(2ww-1) + dx + ww-1``; the 2D one with WD = 1),
    ``relative_offset = ((WD-1)(2WH-1) + WH-1)(2WW-1) + WW-1``, the index of the offset (0, 0, 0)."""
    if WD == 1:
        iy = idx // WW
        code = iy * (2 * WW - 1) + (idx - iy * WW)
    else:
        iz = idx // (WH * WW)
        rest = idx - iz * (WH * WW)
        iy = rest // WW
        code = (iz * (2 * WH - 1) + iy) * (2 * WW - 1) + (rest - iy * WW)
    return code
