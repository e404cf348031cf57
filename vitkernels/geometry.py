"""Swin window coordinates, shared by every backend's host code and by the reference (which imports no backend).

Conventions (timm ``SwinTransformerBlock._attn``; the C++ twin is ``csrc/include/vitkernels/window_geometry.h``):
the image is (B, H, W, C) in NHWC order. The block rolls it by (-shift_h, -shift_w), pads the bottom / right to
(Hp, Wp) = multiples of the window, and partitions it into windows of wh x ww tokens, window-major then row-major
inside a window::

    window w = (b * nWh + wy) * nWw + wx,   token t = iy * ww + ix,
    shifted, padded coordinate (r, s) = (wy * wh + iy, wx * ww + ix).

A padded position (r >= H or s >= W) has no source token. A real one reads the original token
``(y, x) = ((r + roll_h) mod H, (s + roll_w) mod W)``, and the inverse maps (y, x) to
``(r, s) = ((y - roll_h) mod H, (x - roll_w) mod W)``, with ``roll = shift mod size``: a cyclic shift by the
window's shift along an axis of H tokens is a roll by ``shift mod H`` (the shift may exceed the feature map when
the window does, as timm's ``always_partition``). The shifted-window mask, however, uses the shift itself: the
region of r along an axis is 0 if ``r < Hp - wh``, 1 if ``r < Hp - shift``, else 2 (one region when shift is 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch


def padded_size(height: int, width: int, window_size: Sequence[int]) -> Tuple[int, int]:
    """(Hp, Wp): the image size rounded up to whole windows."""
    wh, ww = window_size
    return -(-height // wh) * wh, -(-width // ww) * ww


def relative_position_index(win_h: int, win_w: int, device=None) -> torch.Tensor:
    """(N, N) int64 index into the ((2*wh-1)*(2*ww-1), nH) bias table for every pair of tokens in a window.

    ``index[i, j] = (yi - yj + wh - 1) * (2*ww - 1) + (xi - xj + ww - 1)`` for tokens i = (yi, xi), j = (yj, xj).
    """
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(win_h, device=device, dtype=torch.long),
            torch.arange(win_w, device=device, dtype=torch.long),
            indexing="ij",
        )
    ).flatten(1)  # 2, N
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()  # N, N, 2
    relative[:, :, 0] += win_h - 1
    relative[:, :, 1] += win_w - 1
    relative[:, :, 0] *= 2 * win_w - 1
    return relative.sum(-1)


@dataclass(frozen=True)
class WindowGeometry:
    """Sizes of one shifted-window layout, as the fast kernels' launchers pass them.

    ``roll_h`` / ``roll_w`` are the shifts reduced modulo the image (what the addressing uses, so that
    ``0 <= roll < H``), ``shift_h`` / ``shift_w`` the shifts themselves (what the mask uses).
    """

    B: int
    H: int
    W: int
    wh: int
    ww: int
    shift_h: int
    shift_w: int

    @classmethod
    def of(cls, batch: int, height: int, width: int, window_size: Sequence[int], shift_size: Sequence[int]):
        return cls(int(batch), int(height), int(width), int(window_size[0]), int(window_size[1]),
                   int(shift_size[0]), int(shift_size[1]))

    @property
    def nWh(self) -> int:
        return -(-self.H // self.wh)

    @property
    def nWw(self) -> int:
        return -(-self.W // self.ww)

    @property
    def Hp(self) -> int:
        return self.nWh * self.wh

    @property
    def Wp(self) -> int:
        return self.nWw * self.ww

    @property
    def roll_h(self) -> int:
        return self.shift_h % self.H if self.H else 0

    @property
    def roll_w(self) -> int:
        return self.shift_w % self.W if self.W else 0

    @property
    def tokens_per_window(self) -> int:
        return self.wh * self.ww

    @property
    def windows_per_image(self) -> int:
        return self.nWh * self.nWw

    @property
    def num_windows(self) -> int:
        return self.B * self.nWh * self.nWw

    @property
    def shifted(self) -> bool:
        """Whether the shifted-window mask applies (a non-zero shift on some axis)."""
        return bool(self.shift_h or self.shift_w)

    @property
    def padded(self) -> bool:
        """Whether some window positions have no source token (H or W not a multiple of the window)."""
        return self.Hp != self.H or self.Wp != self.W


@dataclass(frozen=True)
class WindowAxis:
    """One axis of a 3D shifted-window layout (the C++ twin: ``WindowAxis`` in
    ``csrc/include/vitkernels/window_geometry_3d.h``): length ``n``, window ``w``, shift ``s`` (``0 <= s < w``, may
    exceed ``n``) and the padding order.

    A coordinate p of the padded, shifted frame (``0 <= p < P``, ``P = nW * w``) reads the source coordinate
    ``(p + roll) mod P`` when the padding comes first (MONAI, Video Swin: pad, then roll; real if the source is
    ``< n``), else ``(p + roll) mod n`` for ``p < n`` (timm: roll, then pad; ``p >= n`` is padding). ``roll`` is
    ``s`` with the padding first (``s < w <= P``) and ``s mod n`` otherwise, so either wrap is one subtraction."""

    n: int
    w: int
    s: int
    pad_first: bool

    @property
    def nW(self) -> int:
        return -(-self.n // self.w)

    @property
    def P(self) -> int:
        return self.nW * self.w

    @property
    def roll(self) -> int:
        return self.s if self.pad_first else (self.s % self.n if self.n else 0)


@dataclass(frozen=True)
class WindowGeometry3D:
    """A 3D (volumetric / video) shifted-window layout (semantics:
    :mod:`vitkernels.reference.window_attention_3d`): the volume (B, D, H, W, C), windows numbered depth-major
    ``((b * nWd + wz) * nWh + wy) * nWw + wx``, tokens row-major ``(iz * wh + iy) * ww + ix`` in a window. A 2D
    layout (timm's order) is the case ``D = 1, wd = 1, sd = 0, pad_first = False`` (:meth:`of_2d`)."""

    B: int
    d: WindowAxis
    h: WindowAxis
    w: WindowAxis

    @classmethod
    def of(cls, batch: int, size: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int],
           pad_first: bool) -> "WindowGeometry3D":
        axes = [WindowAxis(int(n), int(w), int(s), bool(pad_first)) for n, w, s in zip(size, window_size, shift_size)]
        return cls(int(batch), *axes)

    @classmethod
    def of_2d(cls, g: WindowGeometry) -> "WindowGeometry3D":
        return cls.of(g.B, (1, g.H, g.W), (1, g.wh, g.ww), (0, g.shift_h, g.shift_w), False)

    @property
    def axes(self) -> Tuple[WindowAxis, WindowAxis, WindowAxis]:
        return self.d, self.h, self.w

    @property
    def tokens_per_window(self) -> int:
        return self.d.w * self.h.w * self.w.w

    @property
    def num_windows(self) -> int:
        return self.B * self.d.nW * self.h.nW * self.w.nW

    @property
    def shifted(self) -> bool:
        return any(a.s for a in self.axes)

    @property
    def padded(self) -> bool:
        return any(a.P != a.n for a in self.axes)
