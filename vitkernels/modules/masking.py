"""nn.Modules for masked image modelling: the MAE encoder masking, the MAE decoder unshuffle (owning the mask token),
the MAE loss, and MSN's patch drop, backed by :mod:`vitkernels.ops.masking` / :mod:`vitkernels.ops.mae_loss`.

They slot into the official MAE model (facebookresearch/mae ``models_mae.py``) in place of its steps::

    # forward_encoder
    x = self.patch_embed(imgs)
    x, mask, ids_restore = self.masking(x, self.pos_embed)          # x + pos_embed[:, 1:], random_masking
    x = torch.cat([cls_tokens, x], dim=1) ...
    # forward_decoder
    x = self.decoder_embed(x)
    x = self.unshuffle(x, ids_restore, self.decoder_pos_embed)      # mask tokens, unshuffle, + decoder pos-embed
    ...
    loss = self.loss(imgs, pred, mask)                               # forward_loss

``backend`` (constructor) is passed to every call: ``None`` follows ``$VITKERNELS_BACKEND`` / auto.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from vitkernels._validation import check_ratio
from vitkernels.ops.mae_loss import mae_loss
from vitkernels.ops.masking import mae_unshuffle, msn_patch_drop, random_masking


class MAEMasking(nn.Module):
    """MAE encoder masking: add the patches' positional embedding and keep a random ``1 - mask_ratio`` of them.

    ``forward(x (N, L, D), pos_embed=None, noise=None) -> (x_masked (N, len_keep, D), mask (N, L), ids_restore)``.
    ``pos_embed`` may be the patches' (1 or N, L, D) or the model's whole (1, 1 + L, D) table with the CLS slot
    first (then ``pos_embed[:, 1:]`` is used, as the official encoder). No parameters.
    """

    def __init__(self, mask_ratio: float = 0.75, *, backend: Optional[str] = None):
        super().__init__()
        self.mask_ratio = check_ratio("mask_ratio", mask_ratio)
        self.backend = backend

    def forward(
        self, x: torch.Tensor, pos_embed: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if pos_embed is not None and x.dim() == 3 and pos_embed.dim() == 3 and pos_embed.shape[1] == x.shape[1] + 1:
            pos_embed = pos_embed[:, 1:, :]
        return random_masking(x, self.mask_ratio, noise, pos_embed, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"


class MAEDecoderUnshuffle(nn.Module):
    """MAE decoder input: owns ``mask_token`` (1, 1, D); fills the removed patches with it, restores the patch
    order, keeps CLS in front and adds the decoder positional embedding.

    ``forward(x (N, 1 + len_keep, D), ids_restore (N, L), pos_embed=None (1, 1 + L, D)) -> (N, 1 + L, D)``.
    ``mask_token`` is initialised as the official code (normal, std 0.02).
    """

    def __init__(self, embed_dim: int, *, backend: Optional[str] = None):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.backend = backend
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, x: torch.Tensor, ids_restore: torch.Tensor, pos_embed: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        # under autocast x is half precision and the parameters fp32: the result is fp32, as the official cat / add
        return mae_unshuffle(x, ids_restore, self.mask_token, pos_embed, backend=self.backend)

    def extra_repr(self) -> str:
        return f"embed_dim={self.mask_token.shape[-1]}"


class MAELoss(nn.Module):
    """MAE masked reconstruction loss, ``forward(imgs (N, C, H, W), pred (N, L, p*p*C), mask (N, L)) -> scalar``."""

    def __init__(self, patch_size: int, norm_pix_loss: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.backend = backend

    def forward(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mae_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss, backend=self.backend)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix_loss={self.norm_pix_loss}"


class MSNPatchDrop(nn.Module):
    """MSN patch drop: keep ``floor(L * (1 - drop_ratio))`` patches, one random subset for the whole batch, CLS first.

    ``forward(x (B, 1 + L, D), perm=None) -> (B, 1 + keep, D)``; with ``return_indices=True`` also the (1 + keep,)
    token indices. ``drop_ratio == 0`` leaves ``x`` as it is (the official code skips the drop then).
    """

    def __init__(self, drop_ratio: float = 0.0, *, backend: Optional[str] = None):
        super().__init__()
        self.drop_ratio = check_ratio("drop_ratio", drop_ratio)
        self.backend = backend

    def forward(self, x: torch.Tensor, perm: Optional[torch.Tensor] = None, return_indices: bool = False):
        if self.drop_ratio == 0 and perm is None and not return_indices:
            return x  # nothing dropped, nothing moved (the official code skips the patch drop)
        kept, idx = msn_patch_drop(x, self.drop_ratio, perm, backend=self.backend)
        return (kept, idx) if return_indices else kept

    def extra_repr(self) -> str:
        return f"drop_ratio={self.drop_ratio}"
