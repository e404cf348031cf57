"""Reference: token masking for masked image modelling (MAE) and patch drop (MSN), plus MAE's patchify.

* He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3; official code
  facebookresearch/mae ``models_mae.py``: ``MaskedAutoencoderViT.random_masking``, ``forward_encoder``,
  ``forward_decoder``, ``patchify`` / ``unpatchify``.
* Assran et al., "Masked Siamese Networks for Label-Efficient Learning", ECCV 2022; official code
  facebookresearch/msn ``src/deit.py``: ``VisionTransformer.forward_features`` with ``patch_drop > 0``.

These functions follow the official code step by step (argsort of noise, ``torch.gather`` with an index expanded over
the channel dimension, concatenations); the fused kernels of :mod:`vitkernels.triton.masking` must give the same
numbers (bit-identical indices, masks and gathered tokens for the same noise).

Conventions (as the official code):

* ``L`` patch tokens per sample, ``D`` channels; ``len_keep = int(L * (1 - mask_ratio))`` tokens stay visible.
* ``mask`` is 0 for kept and 1 for removed patches, in the original patch order.
* ``ids_restore[n]`` is the permutation that undoes the shuffle: the rank of each patch's noise in its row.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def num_kept(num_tokens: int, ratio: float) -> int:
    """``int(L * (1 - ratio))``: the official MAE ``len_keep`` (and MSN's ``floor((L) * (1 - patch_drop))``).

    Computed in Python floats exactly as the official code, so e.g. ``L=196, ratio=0.75`` keeps 49.
    """
    return int(num_tokens * (1.0 - ratio))


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    noise: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample random masking by argsort of per-sample noise (``MaskedAutoencoderViT.random_masking``).

    Args:
        x: (N, L, D) patch tokens, CLS not included.
        mask_ratio: fraction of patches removed, in [0, 1).
        noise: (N, L) float noise; ascending noise = kept first. Drawn as ``torch.rand(N, L, device=x.device)`` when
            None (the official call, so the same seed gives the same mask as the official code).
        pos_embed: optional (1, L, D) or (N, L, D) positional embedding of the patch tokens (the official encoder's
            ``pos_embed[:, 1:, :]``), added to ``x`` before the gather; same dtype as ``x``.

    Returns:
        x_masked: (N, len_keep, D), ``x_masked[n, k] = (x + pos_embed)[n, ids_shuffle[n, k]]``.
        mask: (N, L) in ``x.dtype``; 0 = kept, 1 = removed; ``mask[n, l] = ids_restore[n, l] >= len_keep``.
        ids_restore: (N, L) int64, ``argsort(ids_shuffle)``: the rank of ``noise[n, l]`` in row n.

    Ties in ``noise`` are broken by patch index (a *stable* sort), so the result is deterministic; NaN noise sorts
    last (as ``torch.sort``). The official code uses the default (unstable) ``torch.argsort``, which gives the same
    permutation whenever the noise values of a row are distinct (always, in practice, for ``torch.rand`` noise).
    """
    N, L, D = x.shape
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    return mask_by_noise(x, noise, num_kept(L, mask_ratio), pos_embed)


def mask_by_noise(
    x: torch.Tensor, noise: torch.Tensor, len_keep: int, pos_embed: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`random_masking` for given noise and number of kept tokens (the official steps after the draw)."""
    N, L, D = x.shape
    if pos_embed is not None:
        x = x + pos_embed

    # fp16 / bf16 noise sorted as fp32 (exact, same order): torch's CUDA sort of bf16 does not put NaN last
    key = noise.float() if noise.dtype in (torch.float16, torch.bfloat16) else noise
    ids_shuffle = torch.argsort(key, dim=1, stable=True)  # ascending: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # a permutation: no ties, stability is moot

    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))

    mask = torch.ones([N, L], device=x.device)  # the default dtype, as the official code
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle to the original patch order
    return x_masked, mask, ids_restore


def mae_unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MAE decoder input: append mask tokens, undo the shuffle, keep CLS in front, add the decoder pos-embed.

    The steps of the official ``forward_decoder`` between ``decoder_embed`` and the decoder blocks.

    Args:
        x: (N, 1 + len_keep, D) decoder-embedded encoder output, CLS token first.
        ids_restore: (N, L) int64 from :func:`random_masking`.
        mask_token: (1, 1, D) (or (D,)) learned mask token.
        pos_embed: optional (1, 1 + L, D) or (N, 1 + L, D) decoder positional embedding (CLS position first).

    Returns:
        (N, 1 + L, D): ``out[n, 0] = x[n, 0]``; for a patch l, ``out[n, 1 + l] = x[n, 1 + ids_restore[n, l]]`` if
        ``ids_restore[n, l] < len_keep`` else ``mask_token``; plus ``pos_embed``.
    """
    N, L = ids_restore.shape
    D = x.shape[2]
    mask_tokens = mask_token.reshape(1, 1, D).repeat(N, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, D))  # unshuffle
    out = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
    if pos_embed is not None:
        out = out + pos_embed
    return out


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, h * w, p * p * C), the official MAE ``patchify`` ('nchpwq->nhwpqc').

    Patches in row-major order of the (h, w) = (H / p, W / p) grid; inside a patch the features are ordered
    (row in patch, column in patch, channel), channel fastest. Extensions over the official code (which asserts
    ``H == W`` and 3 channels): any channel count and non-square images, ``H`` and ``W`` multiples of ``p``.
    """
    N, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(
    x: torch.Tensor, patch_size: int, grid_size: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    """(N, h * w, p * p * C) -> (N, C, h * p, w * p), the inverse of :func:`patchify` (official ``unpatchify``).

    ``grid_size`` = (h, w) for non-square images; by default the grid is square, ``h = w = sqrt(L)`` as the
    official code. ``C = x.shape[2] // p**2``.
    """
    N, L, PPC = x.shape
    p = patch_size
    if grid_size is None:
        h = w = int(round(L ** 0.5))
    else:
        h, w = grid_size
    C = PPC // (p * p)
    x = x.reshape(N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, C, h * p, w * p)


def msn_patch_drop(
    x: torch.Tensor, drop_ratio: float, perm: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MSN random patch drop: keep a random subset of patches, the same for the whole batch, CLS kept in front.

    As the official ``forward_features`` with ``patch_drop > 0``: ``keep = floor(L * (1 - drop_ratio))``,
    ``idx = cat([0], 1 + perm[:keep])``, ``x[:, idx, :]``.

    Args:
        x: (B, 1 + L, D) tokens, CLS first (positional embedding already added).
        drop_ratio: fraction of patches dropped, in [0, 1).
        perm: optional (L,) int64 permutation of ``range(L)`` shared by the batch; ``torch.randperm(L)`` (on the
            CPU generator, as the official code) when None.

    Returns:
        kept: (B, 1 + keep, D), ``kept[:, k] = x[:, idx[k]]``.
        idx: (1 + keep,) int64 token indices used, ``idx[0] = 0`` (CLS), on ``x.device``.

    With ``drop_ratio == 0`` and no ``perm`` nothing is dropped and the tokens stay in their order, as the official
    code (which skips the patch drop when ``patch_drop == 0``); ``idx`` is then ``arange(1 + L)``.
    """
    L = x.shape[1] - 1
    keep = num_kept(L, drop_ratio)
    if perm is None:
        perm = torch.arange(L) if drop_ratio == 0 else torch.randperm(L)
    perm = perm.to(device=x.device, dtype=torch.int64)
    idx = torch.cat([torch.zeros(1, dtype=torch.int64, device=x.device), 1 + perm[:keep]])
    return x[:, idx, :], idx
