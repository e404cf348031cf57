"""Reference: the MAE masked reconstruction loss (official ``MaskedAutoencoderViT.forward_loss``).

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3 ("Reconstruction target" and the
normalized-pixel variant); official code facebookresearch/mae ``models_mae.py``.

    target = patchify(imgs)                                     (N, L, P),  P = p * p * C
    if norm_pix_loss:                                           per patch, over its P values:
        target = (target - mean) / sqrt(var + 1e-6)             var UNBIASED (divides by P - 1), as torch.var
    loss_l = mean_e (pred - target)**2                          (N, L) mean squared error per patch
    loss   = sum(loss_l * mask) / sum(mask)                     averaged over the removed patches (mask == 1)

With ``mask.sum() == 0`` (mask ratio 0) the official code divides 0 by 0 and returns NaN; so does this reference.
"""
from __future__ import annotations

import torch

from vitkernels.reference.masking import patchify

NORM_PIX_EPS = 1e-6


def patch_targets(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool = False) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p * p * C): the reconstruction targets, per-patch normalised if ``norm_pix_loss``."""
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    return target


def mae_loss(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = False,
) -> torch.Tensor:
    """MAE loss: per-patch MSE of ``pred`` against the (normalised) pixels, averaged over removed patches.

    Args:
        imgs: (N, C, H, W) images, ``H`` and ``W`` multiples of ``patch_size``.
        pred: (N, L, p * p * C) decoder predictions, ``L = (H / p) * (W / p)``, features in :func:`patchify` order.
        mask: (N, L) weights, 1 = removed (the loss is taken there), 0 = kept.
        patch_size: p.
        norm_pix_loss: normalise each target patch by its mean and unbiased variance (eps 1e-6).

    Returns:
        A scalar tensor in the promoted dtype of (imgs, pred, mask), as the official arithmetic gives.
    """
    target = patch_targets(imgs, patch_size, norm_pix_loss)
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # (N, L), mean loss per patch
    return (loss * mask).sum() / mask.sum()  # mean loss on removed patches
