"""Reference: ViT / DeiT patch embedding, prefix (CLS / distillation / register) tokens and absolute position embedding.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", ICLR 2021, Eq. 1;
Touvron et al., "Training data-efficient image transformers & distillation through attention" (DeiT), ICML 2021,
Sec. 5 (the distillation token); Darcet et al., "Vision Transformers Need Registers", ICLR 2024 (register tokens).
Follows timm 1.0: ``timm/layers/patch_embed.py`` (``PatchEmbed``, ``resample_patch_embed``),
``timm/layers/pos_embed.py`` (``resample_abs_pos_embed``) and ``VisionTransformer._pos_embed`` /
``VisionTransformerDistilled._pos_embed`` (``timm/models/vision_transformer.py``, ``timm/models/deit.py``).

The op, for an image ``x`` (B, C, H, W), a projection ``weight`` (D, C, ph, pw) (a Conv2d weight with stride = kernel)
and an optional ``bias`` (D):

1. ``dynamic_img_pad``: zero-pad bottom / right up to whole patches (otherwise H, W must be multiples of ph, pw).
2. patchify: ``A[b, l, k] = x[b, c, gy*ph + py, gx*pw + px]`` with the patch index ``l = gy*gw + gx`` (row-major
   over the (gh, gw) grid) and the feature index ``k = (c*ph + py)*pw + px`` -- the (c, ph, pw) order of the flattened
   Conv2d weight, so that ``A @ weight.reshape(D, -1).T`` equals the stride-p convolution, flattened NCHW -> NLC.
3. tokens = ``A @ W^T + bias``: (B, L, D), ``L = gh * gw``.
4. ``_pos_embed`` (timm): prefix tokens (P, D) -- CLS, then the DeiT distillation token or the register tokens --
   are broadcast over the batch and concatenated in front of the patch tokens, and the position embedding added:
   ``no_embed_class=False`` (original ViT / DeiT): concat, then add ``pos_embed`` (1, P + L, D);
   ``no_embed_class=True`` (DeiT III, big_vision, DINOv2 registers): add ``pos_embed`` (1, L, D), then concat.

Output: (B, P + L, D).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels.reference.layers import Format, nchw_to, to_2tuple

IntOrPair = Union[int, Tuple[int, int]]


# --- functional ---------------------------------------------------------------------------------------------------

def grid_size(height: int, width: int, patch_size: Tuple[int, int], dynamic_img_pad: bool = False) -> Tuple[int, int]:
    """(gh, gw): patches per column and row; rounded up with ``dynamic_img_pad``, down otherwise (as a stride-p conv)."""
    ph, pw = patch_size
    if dynamic_img_pad:
        return -(-height // ph), -(-width // pw)
    return height // ph, width // pw


def pad_to_patches(x: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right up to multiples of the patch size (timm ``dynamic_img_pad``)."""
    ph, pw = patch_size
    pad_h = (ph - x.shape[-2] % ph) % ph
    pad_w = (pw - x.shape[-1] % pw) % pw
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def patchify(x: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh*gw, C*ph*pw): non-overlapping patches, row-major, each flattened in (c, py, px) order.

    H and W must be multiples of the patch size.
    """
    B, C, H, W = x.shape
    ph, pw = patch_size
    if H % ph or W % pw:
        raise ValueError(f"image size {(H, W)} is not a multiple of the patch size {(ph, pw)}")
    gh, gw = H // ph, W // pw
    return x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)


def _pos_embed(
    tokens: torch.Tensor,
    pos: Optional[torch.Tensor],
    prefix_tokens: Optional[torch.Tensor],
    no_embed_class: bool,
) -> torch.Tensor:
    B = tokens.shape[0]
    to_cat = []
    if prefix_tokens is not None and prefix_tokens.shape[-2] > 0:
        to_cat.append(prefix_tokens.reshape(1, -1, prefix_tokens.shape[-1]).expand(B, -1, -1))
    if pos is not None:
        pos = pos.reshape(1, -1, pos.shape[-1])
    if pos is not None and no_embed_class:
        tokens = tokens + pos
    if to_cat:
        tokens = torch.cat(to_cat + [tokens], dim=1)
    if pos is not None and not no_embed_class:
        tokens = tokens + pos
    return tokens


def pos_embed(
    tokens: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
    no_embed_class: bool = False,
) -> torch.Tensor:
    """timm's ``_pos_embed`` step alone: prefix-token concatenation and absolute position embedding.

    Args:
        tokens: (B, L, D) patch tokens.
        pos_embed: (1, N, D) or (N, D); N = P + L if not ``no_embed_class`` else L. None: concatenation only.
        prefix_tokens: (1, P, D) or (P, D): CLS, then dist (DeiT) or register tokens, in that order; None for P = 0.
        no_embed_class: add the position embedding to the patch tokens only, before the concatenation.

    Returns:
        (B, P + L, D).
    """
    return _pos_embed(tokens, pos_embed, prefix_tokens, no_embed_class)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
    no_embed_class: bool = False,
    dynamic_img_pad: bool = False,
) -> torch.Tensor:
    """Patchify + projection + bias + prefix-token concat + position embedding (see the module docstring).

    Args:
        x: (B, C, H, W) image; H, W multiples of the patch size unless ``dynamic_img_pad``.
        weight: (D, C, ph, pw) projection (timm ``patch_embed.proj.weight``).
        bias: (D,) or None.
        pos_embed, prefix_tokens, no_embed_class: as :func:`pos_embed`.
        dynamic_img_pad: zero-pad bottom / right to whole patches first.

    Returns:
        (B, P + L, D) with L = gh * gw.
    """
    patch = (weight.shape[-2], weight.shape[-1])
    if dynamic_img_pad:
        x = pad_to_patches(x, patch)
    tokens = torch.matmul(patchify(x, patch), weight.reshape(weight.shape[0], -1).t())
    if bias is not None:
        tokens = tokens + bias
    return _pos_embed(tokens, pos_embed, prefix_tokens, no_embed_class)


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: Sequence[int],
    old_size: Optional[Sequence[int]] = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a (1, P + gh*gw, D) position embedding to a new grid (timm ``resample_abs_pos_embed``).

    The first ``num_prefix_tokens`` rows are kept; the grid part is interpolated as a (D, gh, gw) image in fp32.
    """
    num_new = new_size[0] * new_size[1] + num_prefix_tokens
    if num_new == posemb.shape[1]:
        if old_size is not None and tuple(old_size) == tuple(new_size):
            return posemb
        if old_size is None and new_size[0] == new_size[1]:
            return posemb
    if old_size is None:
        side = int(math.sqrt(posemb.shape[1] - num_prefix_tokens))
        old_size = (side, side)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    image = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = image.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


def resample_patch_embed(
    weight: torch.Tensor, new_size: Sequence[int], interpolation: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """Resize a (D, C, ph, pw) patch-embedding kernel to a new patch size (FlexiViT, Beyer et al., CVPR 2023).

    The kernel is mapped through the pseudo-inverse of the (linear) image-resize operator, so that the resized kernel
    applied to a resized patch gives approximately the old kernel applied to the old patch (timm
    ``resample_patch_embed``, after big_vision ``flexi/vit.py``).
    """
    old_size = tuple(weight.shape[-2:])
    new_size = tuple(new_size)
    if old_size == new_size:
        return weight
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, device=weight.device, dtype=torch.float32).reshape(n_old, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    resize_matrix = resized.squeeze(1).permute(1, 2, 0).reshape(-1, n_old)  # (new, old): resize of a flat patch
    pinv = torch.linalg.pinv(resize_matrix)  # (old, new)
    D, C = weight.shape[:2]
    out = weight.reshape(D, C, n_old).float() @ pinv
    return out.reshape(D, C, *new_size).to(weight.dtype)


# --- modules ------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """2D image to patch embedding (timm ``timm.layers.PatchEmbed``: same constructor, attributes, state dict).

    ``proj`` is a Conv2d with kernel = stride = patch size; ``norm`` a LayerNorm-like layer or Identity.
    Input (B, C, H, W); output (B, L, D) when ``flatten`` (the default), else in ``output_fmt``
    (NCHW, NHWC, NLC or NCL). Checks as timm: with ``img_size`` set and ``strict_img_size``, (H, W) must equal
    ``img_size``; otherwise, without ``dynamic_img_pad``, H and W must be multiples of the patch size
    (with ``img_size=None`` there is no check and the convolution drops incomplete patches).
    """

    def __init__(
        self,
        img_size: Optional[IntOrPair] = 224,
        patch_size: IntOrPair = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable] = None,
        flatten: bool = True,
        output_fmt: Optional[str] = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)
        if output_fmt is not None:
            self.flatten = False
            self.output_fmt = Format(output_fmt)
        else:
            self.flatten = flatten
            self.output_fmt = Format.NCHW
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def _init_img_size(self, img_size: Optional[IntOrPair]):
        if img_size is None:
            return None, None, None
        img_size = to_2tuple(img_size)
        grid = tuple(s // p for s, p in zip(img_size, self.patch_size))
        return img_size, grid, grid[0] * grid[1]

    def set_input_size(self, img_size: Optional[IntOrPair] = None, patch_size: Optional[IntOrPair] = None) -> None:
        """Change the expected image size and / or the patch size (the kernel is resampled, FlexiViT-style)."""
        new_patch = to_2tuple(patch_size) if patch_size is not None else None
        if new_patch is not None and new_patch != self.patch_size:
            with torch.no_grad():
                old = self.proj
                new = nn.Conv2d(
                    old.in_channels, old.out_channels, kernel_size=new_patch, stride=new_patch,
                    bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype,
                )
                new.weight.copy_(resample_patch_embed(old.weight, new_patch))
                new.weight.requires_grad_(old.weight.requires_grad)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
                    new.bias.requires_grad_(old.bias.requires_grad)
                new.train(old.training)
                self.proj = new
            self.patch_size = new_patch
        img_size = img_size or self.img_size
        if img_size != self.img_size or new_patch is not None:
            self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def feat_ratio(self, as_scalar: bool = True) -> Union[Tuple[int, int], int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid (gh, gw) for an image of ``img_size``, taking ``dynamic_img_pad`` into account."""
        return grid_size(img_size[0], img_size[1], self.patch_size, self.dynamic_img_pad)

    def input_size_error(self, x: torch.Tensor) -> Optional[str]:
        """What timm's assertions on the image size say about ``x`` (None: they pass)."""
        H, W = x.shape[-2:]
        if self.img_size is None:
            return None
        if self.strict_img_size:
            if (H, W) != tuple(self.img_size):
                return f"x: input size ({H}, {W}) doesn't match the model's img_size {tuple(self.img_size)}"
        elif not self.dynamic_img_pad and (H % self.patch_size[0] or W % self.patch_size[1]):
            return f"x: input size ({H}, {W}) should be divisible by the patch size {self.patch_size}"
        return None

    def check_input(self, x: torch.Tensor) -> None:
        """timm's assertions on the image size (raised as ValueError naming ``x``)."""
        error = self.input_size_error(x)
        if error is not None:
            raise ValueError(error)

    def format_tokens(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, L, D) tokens -> this module's output layout."""
        if self.flatten or self.output_fmt == Format.NLC:
            return tokens
        B, _, D = tokens.shape
        if self.output_fmt == Format.NHWC:
            return tokens.reshape(B, grid[0], grid[1], D)
        if self.output_fmt == Format.NCL:
            return tokens.transpose(1, 2)
        return tokens.transpose(1, 2).reshape(B, D, grid[0], grid[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.dynamic_img_pad:
            x = pad_to_patches(x, self.patch_size)
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)

    def extra_repr(self) -> str:
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, output_fmt={self.output_fmt.value}, "
            f"flatten={self.flatten}, dynamic_img_pad={self.dynamic_img_pad}"
        )


EMBEDDING_KEYS = ("cls_token", "reg_token", "dist_token", "pos_embed")


def vit_embedding_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """The entries of a timm ViT / DeiT state dict that belong to :class:`ViTEmbedding`, with ``prefix`` stripped.

    Keeps ``patch_embed.*`` and ``cls_token`` / ``reg_token`` / ``dist_token`` / ``pos_embed``.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith("patch_embed.") or name in EMBEDDING_KEYS:
            out[name] = value
    return out


class ViTEmbedding(nn.Module):
    """The embedding stem of a timm ``VisionTransformer`` / ``VisionTransformerDistilled``, as one module.

    ``patch_embed`` (:class:`PatchEmbed`), ``cls_token`` (1, 1, D), ``dist_token`` (1, 1, D, DeiT ``distilled``),
    ``reg_token`` (1, R, D), ``pos_embed`` (1, N, D) with N = L (``no_embed_class``) or L + P -- the timm parameter
    names, so the embedding entries of a timm ViT / DeiT state dict load into it (:func:`vit_embedding_state_dict`
    or :meth:`from_timm`). Prefix order as timm: CLS, then dist (DeiT) or registers (ViT). Forward =
    ``model.patch_embed`` followed by ``model._pos_embed`` (including ``pos_drop``): (B, C, H, W) -> (B, P + L, D).

    Constructor arguments are those of ``VisionTransformer`` that concern the embedding, plus ``distilled`` (the
    DeiT distillation token) and ``bias`` (timm passes ``bias=not pre_norm`` to its patch embedding).
    ``dynamic_img_size`` resamples the position embedding to the image's grid (bicubic, as timm).
    """

    def __init__(
        self,
        img_size: IntOrPair = 224,
        patch_size: IntOrPair = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        class_token: bool = True,
        reg_tokens: int = 0,
        distilled: bool = False,
        no_embed_class: bool = False,
        pos_embed: str = "learn",
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        bias: bool = True,
        embed_norm_layer: Optional[Callable] = None,
        pos_drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if pos_embed not in ("", "none", "learn"):
            raise ValueError(f"pos_embed must be '', 'none' or 'learn', got {pos_embed!r}")
        if distilled and (not class_token or reg_tokens):
            raise ValueError("distilled (DeiT) embeddings have exactly a class token and a distillation token")
        self.embed_dim = embed_dim
        self.has_class_token = class_token
        self.distilled = distilled
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        embed_args = dict(strict_img_size=False, output_fmt="NHWC") if dynamic_img_size else {}
        self.patch_embed = self.patch_embed_class()(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=embed_norm_layer, bias=bias, dynamic_img_pad=dynamic_img_pad, **embed_args, **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        self.dist_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if distilled else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        if pos_embed in ("", "none"):
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.empty(1, embed_len, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.reset_parameters()

    @staticmethod
    def patch_embed_class() -> type:
        return PatchEmbed

    def reset_parameters(self) -> None:
        """timm's init: pos_embed and dist_token truncated normal (std .02), cls / reg tokens normal (std 1e-6)."""
        with torch.no_grad():
            if self.pos_embed is not None:
                nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=1e-6)
            if self.reg_token is not None:
                nn.init.normal_(self.reg_token, std=1e-6)
            if self.dist_token is not None:
                nn.init.trunc_normal_(self.dist_token, std=0.02, a=-2.0, b=2.0)

    def prefix_tokens(self) -> Optional[torch.Tensor]:
        """(1, P, D): CLS, then dist or registers, concatenated in timm's order; None when P = 0."""
        parts = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def grid_pos_embed(self, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
        """The position embedding for a (gh, gw) token grid: ``pos_embed`` itself, resampled if
        ``dynamic_img_size`` and the grid differs from the one it was built for."""
        if self.pos_embed is None or not self.dynamic_img_size:
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed, grid, old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
        )

    def set_input_size(self, img_size: Optional[IntOrPair] = None, patch_size: Optional[IntOrPair] = None) -> None:
        """timm ``VisionTransformer.set_input_size``: new image / patch size, position embedding resampled."""
        prev_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        if self.pos_embed is not None:
            num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            if (self.patch_embed.num_patches + num_prefix != self.pos_embed.shape[1]
                    or self.patch_embed.grid_size != prev_grid):
                self.pos_embed = nn.Parameter(
                    resample_abs_pos_embed(self.pos_embed, self.patch_embed.grid_size, prev_grid, num_prefix),
                    requires_grad=self.pos_embed.requires_grad,
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        grid = tuple(tokens.shape[1:3]) if self.dynamic_img_size else self.patch_embed.grid_size
        tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
        return self.pos_drop(_pos_embed(tokens, self.grid_pos_embed(grid), self.prefix_tokens(), self.no_embed_class))

    @classmethod
    def from_timm(cls, model: nn.Module) -> "ViTEmbedding":
        """Build an embedding with a timm ``VisionTransformer`` / ``VisionTransformerDistilled``'s configuration and
        load its embedding parameters (same device and dtype)."""
        pe = model.patch_embed
        param = pe.proj.weight
        norm = pe.norm
        embed = cls(
            img_size=pe.img_size,
            patch_size=pe.patch_size,
            in_chans=pe.proj.in_channels,
            embed_dim=pe.proj.out_channels,
            class_token=getattr(model, "cls_token", None) is not None,
            reg_tokens=getattr(model, "num_reg_tokens", 0) if getattr(model, "reg_token", None) is not None else 0,
            distilled=getattr(model, "dist_token", None) is not None,
            no_embed_class=bool(getattr(model, "no_embed_class", False)),
            pos_embed="learn" if getattr(model, "pos_embed", None) is not None else "none",
            dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
            dynamic_img_pad=bool(pe.dynamic_img_pad),
            bias=pe.proj.bias is not None,
            embed_norm_layer=None if isinstance(norm, nn.Identity) else (lambda dim, **kw: copy.deepcopy(norm)),
            pos_drop_rate=model.pos_drop.p if isinstance(getattr(model, "pos_drop", None), nn.Dropout) else 0.0,
            device=param.device,
            dtype=param.dtype,
        )
        embed.load_state_dict(vit_embedding_state_dict(model.state_dict()))
        return embed

