"""Triton kernels for 3D (volumetric / video) shifted-window attention: MONAI SwinUNETR, Video Swin; semantics in
:mod:`vitkernels.reference.window_attention_3d`.

The 3D op runs the 2D op's kernels (:mod:`vitkernels.triton.window_attention`, as Swin V2 does), whose window
addressing (:mod:`vitkernels.triton.window_geometry`) has a depth axis: ``qkv`` is (B, D, H, W, 3C), windows
``((b * nWd + wz) * nWh + wy) * nWw + wx`` of ``N = wd * wh * ww`` tokens ``(iz * wh + iy) * ww + ix``, and per axis
the roll and the padding in either order (``PAD_FIRST``, ``pad_before_shift=True``: MONAI / Video Swin pad, then
roll the padded volume, so padded positions are rolled too; False: timm's roll, then pad). Nothing is materialised:
a real position reads its source token of ``qkv``, a padded one the qkv bias (or zeros), outputs are stored at
their source tokens.

Per (window, head), in fp32: ``S = scale q k^T + table[rel(i, j), h] + mask(i, j)`` with the 3D relative index
``rel = (dz + wd-1)(2wh-1)(2ww-1) + (dy + wh-1)(2ww-1) + dx + ww-1`` (the dense (nH, NP, NP) log2-scaled bias built
once per call from the ((2wd-1)(2wh-1)(2ww-1), nH) table), ``mask = -100`` between the 27 regions of the shifted
padded volume (only windows last along a shifted axis compare regions), ``P = softmax(S)``, ``O = P v``; the
backward recomputes P from the row log-sum-exp and folds the (groups, nH, N, N) dS partials into the table's
gradient in a fixed order (no atomics: deterministic).

Windows: MONAI's 7x7x7 (343 tokens) and Video Swin's 8x7x7 (392) take the large-window configurations (forward
key chunks of 32, dQ query tiles of 16 rows over a run-time loop of key chunks of 32, a dK / dV kernel); up to
:data:`MAX_TOKENS_PER_WINDOW` tokens, head_dim a power of two in [16, 128] (:func:`supported_reason`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from vitkernels.triton._launch import Example, LaunchConfig, Target
from vitkernels.triton.window_attention import attention_bwd, attention_fwd, examples_of
from vitkernels.triton.window_attention import launch_table as _v1_launch_table
from vitkernels.triton.window_attention import supported_reason as _v1_supported_reason

MAX_TOKENS_PER_WINDOW = 512  # 8x8x8 (the range the examples and the compile gate cover)


def launch_table(N: int, head_dim: int, dtype: torch.dtype, target: Target) -> Dict[str, LaunchConfig]:
    """The 2D op's table (:func:`vitkernels.triton.window_attention.launch_table`): it depends on the tokens per
    window, not on the window's shape."""
    return _v1_launch_table(N, head_dim, dtype, target)


def supported_reason(head_dim: int, tokens_per_window: int, dtype: torch.dtype,
                     target: Optional[Target] = None) -> Optional[str]:
    """``None`` if the kernels handle this configuration (on ``target``, when given), else why not: the 2D op's
    limits, with windows of up to :data:`MAX_TOKENS_PER_WINDOW` tokens."""
    return _v1_supported_reason(head_dim, tokens_per_window, dtype, target, max_tokens=MAX_TOKENS_PER_WINDOW)


# (B, (D, H, W), num_heads, window, shift, pad_before_shift): one tiny problem per class of the table (windows of
# up to 16, 32, 64 tokens, larger ones, and each key-chunk pattern), every padding order, shifts on one to three
# axes, padding along some axes. Windows of 257 to 512 tokens are one class (the same table, the dQ kernel looping
# over chunks of 32 keys at run time: key_chunks): its example is the smallest such window, 5x6x9 = 270 tokens (the
# interpreter's time grows with the tokens and the chunks: MONAI's 7x7x7 took ~60% longer); 7x7x7 and Video Swin's
# 8x7x7 are the compile gate's headline problems and the numerics tests'.
_EXAMPLE_CASES = [
    (1, (2, 2, 3), 1, (2, 2, 2), (1, 1, 1), True),     # N = 8 -> 16, padded along W, rolled padding, 27 regions
    (1, (2, 3, 4), 1, (2, 3, 3), (0, 1, 2), False),    # N = 18 -> 32, padded along W, timm's order
    (1, (3, 4, 4), 1, (3, 4, 4), (1, 2, 0), True),     # N = 48 -> 64, one window, shifted along D and H
    (1, (4, 4, 6), 1, (4, 4, 5), (2, 0, 2), True),     # N = 80 -> 64 + 16 key chunks, padded along W
    (1, (4, 6, 7), 1, (4, 6, 6), (2, 3, 3), False),    # N = 144 -> 128 + 16, padded along W, timm's order
    (1, (5, 6, 9), 1, (5, 6, 9), (2, 3, 4), True),     # N = 270 -> 9 looped chunks of 32 (the class of 7x7x7)
]


def table_examples() -> List[Example]:
    """Every configuration :func:`launch_table` returns for windows of up to :data:`MAX_TOKENS_PER_WINDOW` tokens,
    each with a tiny problem ``((B, (D, H, W), nH, hd, window, shift, pad_before_shift), dtype)``."""
    cases = [(window[0] * window[1] * window[2], lambda hd, c=(B, size, nH, window, shift, first):
              (*c[:3], hd, *c[3:])) for B, size, nH, window, shift, first in _EXAMPLE_CASES]
    return examples_of("window_attention_3d", cases)


def window_attention_3d_fwd(
    qkv: torch.Tensor,
    table: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    num_heads: int,
    scale: float,
    pad_before_shift: bool,
    need_lse: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, D, H, W, 3C) qkv, ((2wd-1)(2wh-1)(2ww-1), nH) table -> ((B, D, H, W, C) out, (B*nW, nH, N) fp32 row
    log-sum-exp, or an empty tensor when ``need_lse`` is False)."""
    return attention_fwd(qkv, table, qkv_bias, window_size, shift_size, num_heads, scale, None, need_lse,
                         pad_before_shift)


def window_attention_3d_bwd(
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
    pad_before_shift: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients (qkv, table, qkv_bias or None) of :func:`window_attention_3d_fwd`, in the inputs' dtypes."""
    dqkv, d_table, _, d_qkv_bias = attention_bwd(grad_out, qkv, table, qkv_bias, out, lse, window_size, shift_size,
                                                 num_heads, scale, None, pad_before_shift)
    return dqkv, d_table, d_qkv_bias
