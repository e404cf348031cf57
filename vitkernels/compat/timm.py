"""Swap parts of timm models for vitkernels modules in place (same parameters, same state-dict keys, same numbers).

Imports nothing of timm: the functions read the timm model's attributes.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from vitkernels.modules.patch_embed import PatchEmbed, embed
from vitkernels.reference.patch_embed import resample_abs_pos_embed


# --- ViT / DeiT embedding -----------------------------------------------------------------------------------------

def patch_vit_embedding(model: nn.Module, fuse_pos_embed: bool = True) -> nn.Module:
    """Run a timm ``VisionTransformer`` / ``VisionTransformerDistilled``'s embedding through the fused patch-embed op.

    ``model.patch_embed`` (a timm ``PatchEmbed``) is replaced by a :class:`vitkernels.modules.patch_embed.PatchEmbed`
    holding the very same ``proj`` / ``norm`` modules, so parameters (and optimizers referring to them) and
    state-dict keys do not change.

    * ``fuse_pos_embed=True`` (default): the new ``patch_embed`` also does timm's ``_pos_embed`` (prefix tokens --
      CLS, then DeiT dist or registers -- and the position embedding, resampled if ``dynamic_img_size``) in the same
      op, reading ``cls_token`` / ``dist_token`` / ``reg_token`` / ``pos_embed`` from ``model`` at each call; the
      model's ``_pos_embed`` becomes just its ``pos_drop``. ``forward``, ``forward_features`` and
      ``forward_intermediates`` give the same results as before; ``model.patch_embed(x)`` alone now returns the
      embedded (B, P + L, D) tokens.
    * ``fuse_pos_embed=False``: only the projection runs on the op; ``patch_embed`` keeps timm's output.

    Returns ``model`` (modified in place).
    """
    fused = fuse_pos_embed and hasattr(model, "_pos_embed") and hasattr(model, "pos_embed")
    new = _adopt(FusedViTPatchEmbed if fused else PatchEmbed, model.patch_embed)
    model.patch_embed = new
    if fused:
        new._owner = [model]  # in a list: not a registered submodule, so no cycle in modules() / state_dict()
        model._pos_embed = types.MethodType(_pos_drop_only, model)
    return model


def _adopt(cls, old: nn.Module) -> nn.Module:
    """An instance of ``cls`` (a vitkernels PatchEmbed) sharing ``old``'s ``proj`` / ``norm`` and configuration."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name in ("patch_size", "img_size", "grid_size", "num_patches", "output_fmt", "flatten", "strict_img_size",
                 "dynamic_img_pad"):
        setattr(new, name, getattr(old, name))
    new.proj = old.proj
    new.norm = old.norm
    new.train(old.training)
    return new


def _pos_drop_only(self, x: torch.Tensor) -> torch.Tensor:
    # timm's _pos_embed skips pos_drop when there is no position embedding
    return x if self.pos_embed is None else self.pos_drop(x)


def _vit_prefix_tokens(model: nn.Module) -> Optional[torch.Tensor]:
    """(1, P, D) prefix tokens in timm's order: CLS + dist for DeiT (``VisionTransformerDistilled._pos_embed``),
    else CLS (if any) + registers (if any)."""
    dist = getattr(model, "dist_token", None)
    if dist is not None:
        parts = [model.cls_token, dist]
    else:
        parts = [t for t in (getattr(model, "cls_token", None), getattr(model, "reg_token", None)) if t is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class FusedViTPatchEmbed(PatchEmbed):
    """A timm ViT's ``patch_embed`` + ``_pos_embed`` in one op, prefix tokens and position embedding read from the
    owning model (set by :func:`patch_vit_embedding`)."""

    _owner: list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._owner[0]
        no_embed_class = bool(getattr(model, "no_embed_class", False))

        def pos_for_grid(grid):
            pos = model.pos_embed
            if pos is None or not getattr(model, "dynamic_img_size", False):
                return pos
            return resample_abs_pos_embed(
                pos, grid, old_size=self.grid_size, num_prefix_tokens=0 if no_embed_class else model.num_prefix_tokens
            )

        return embed(self, x, pos_for_grid, _vit_prefix_tokens(model), no_embed_class)
