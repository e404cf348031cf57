"""Swap parts of timm models for vitkernels modules in place (same parameters, same state-dict keys, same numbers).

Imports nothing of timm: the functions read the timm model's attributes.
"""
from __future__ import annotations

import functools
import re
import types
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from vitkernels.compat._patching import FusedClasses, FusedModule, patch_linears, switch_class
from vitkernels.modules import vit as _vit
from vitkernels.modules.patch_embed import PatchEmbed, embed, patch_embed_forward, projection_served
from vitkernels.reference import patch_embed as _reference_patch_embed
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


# --- ViT / DeiT blocks (class swap) ---------------------------------------------------------------------------------

class _FusedViTBlock(FusedModule):
    """timm ``vision_transformer.Block`` whose forward runs the fused CPU path (:mod:`vitkernels.modules.vit`)
    where it can serve the call, timm's own forward everywhere else (GPUs, attention masks, q/k norms ...)."""

    def forward(self, x, *args, **kwargs):
        # timm >= 1.0.10 passes attn_mask (and later is_causal) on; the fused path serves only their defaults
        defaults = all(v is None or v is False for v in (*args, *kwargs.values()))
        if defaults and _vit.fused_cpu_ready(self, x, self.vitkernels_backend):
            return _vit.forward_fused_cpu(self, x)
        return super().forward(x, *args, **kwargs)


_VIT_BLOCKS = FusedClasses(__name__, {"Block": "timm.models.vision_transformer"}, lambda cls: (_FusedViTBlock, {}))


def patch_vit_blocks(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Switch every timm ``vision_transformer.Block`` inside ``model`` (``model`` itself included) to a subclass
    running the fused CPU path of :mod:`vitkernels.modules.vit`, in place: the same object, submodules, parameters,
    state dict and hooks; ``unpatch_model`` (:mod:`vitkernels.compat._patching`) switches them back. ``backend``
    (None: ``$VITKERNELS_BACKEND`` or ``auto``) is stored as ``block.vitkernels_backend``; patching twice only
    updates it. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, _FusedViTBlock):
            module.vitkernels_backend = backend
        elif _VIT_BLOCKS.matches(type(module)):
            switch_class(module, _VIT_BLOCKS.fused(type(module)), backend)
    return model


# --- Swin ---------------------------------------------------------------------------------------------------------

class _FusedPatchEmbed(FusedModule):
    """timm ``PatchEmbed`` (Swin's: NHWC output) whose projection runs the fused patch-embedding op where it serves
    the call (:func:`_patch_embed_serves`), timm's forward everywhere else. The op writes the tokens as (B, L, D)
    rows, of which NHWC is a view; timm's conv output permuted to NHWC is not contiguous, so its norm copied it
    first (Swin-T b4 on a 2-core Zen 3: the stem 13.3 -> 8.7 ms in inference, 13.9 -> 6.8 ms forward + backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _patch_embed_serves(self, x, self.vitkernels_backend):
            return patch_embed_forward(self, x, self.vitkernels_backend)
        return super().forward(x)


def _patch_embed_serves(module: nn.Module, x: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether the fused op computes timm ``PatchEmbed`` ``module``'s ``module(x)``: its projection served
    (:func:`vitkernels.modules.patch_embed.projection_served`) and an image size timm accepts (a bad one goes to
    timm's forward, for timm's error)."""
    return (projection_served(module.proj, module.patch_size, x, backend)
            and _reference_patch_embed.PatchEmbed.input_size_error(module, x) is None)


_PATCH_EMBEDS = FusedClasses(__name__, {"PatchEmbed": "timm.layers.patch_embed"},
                             lambda cls: (_FusedPatchEmbed, {}))


def patch_swin_embedding(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Switch every timm ``PatchEmbed`` with NHWC output inside ``model`` (Swin V1 / V2's stem; ``model`` itself
    included) to a subclass computing its projection with the fused patch-embedding op (:class:`_FusedPatchEmbed`),
    in place: the same object, ``proj`` / ``norm``, parameters, state dict and hooks; ``unpatch_model`` switches
    it back. :func:`patch_model` calls it. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, _FusedPatchEmbed):
            module.vitkernels_backend = backend
        elif _PATCH_EMBEDS.matches(type(module)) and getattr(module, "output_fmt", None) == "NHWC" \
                and not getattr(module, "flatten", True):
            switch_class(module, _PATCH_EMBEDS.fused(type(module)), backend)
    return model


def patch_model(model: nn.Module, backend: Optional[str] = None, linear: bool = True) -> nn.Module:
    """Swap every timm ``SwinTransformerBlock`` inside ``model`` for a :class:`vitkernels.SwinBlock`, and every timm
    ``SwinTransformerV2Block`` (``swinv2_*`` models) for a :class:`vitkernels.SwinV2Block`, and every timm V1
    ``PatchMerging`` for a :class:`vitkernels.PatchMerging`, then every timm V1 ``SwinTransformerStage`` for a
    :class:`vitkernels.SwinTransformerStage` holding those (which chains its blocks' fused CPU path; a stage with
    hooks of its own is kept), in place; with ``linear=True`` (default) every remaining plain ``nn.Linear`` too
    (:func:`patch_linears`: ViT / DeiT attention and MLP Linears, heads, Swin V2's Linears). The Swin stem (timm's
    ``PatchEmbed`` with NHWC output) switches its class to one projecting through the fused patch-embedding op
    (:func:`patch_swin_embedding`).

    The new modules hold the very same submodules and parameters (``norm1``, ``attn.qkv``,
    ``attn.relative_position_bias_table`` / ``attn.cpb_mlp``, ``mlp``, ``reduction`` ...), so state-dict keys,
    optimizers and weight tying are unaffected, and compute the same numbers with fused kernels; timm's
    ``set_input_size`` reaches them. Modules are recognised by class name and attributes, so timm is not imported.
    ``model`` may itself be a block. Every timm ViT ``Block`` (ViT, DeiT, the official MAE code's encoder and
    decoder) switches its class to one running the fused CPU path of :mod:`vitkernels.modules.vit`
    (:func:`patch_vit_blocks`: the same object, parameters and state dict). Returns the (possibly new) root module.
    """
    model = _replace_modules(model, lambda m: _convert_timm_block(m, backend))
    # stages in a second pass: a new stage takes its (by now converted) downsample and blocks as they are
    model = _replace_modules(model, lambda m: stage_from_timm(m, backend) if _is_timm_swin_stage(m) else None)
    patch_swin_embedding(model, backend)
    patch_vit_blocks(model, backend)
    if linear:
        patch_linears(model, backend)
    return model


def _replace_modules(model: nn.Module, convert) -> nn.Module:
    """``model`` with each module for which ``convert`` returns a module replaced by it (the root, or else its
    descendants); returns the (possibly new) root."""
    converted = convert(model)
    if converted is not None:
        return converted
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            converted = convert(child)
            if converted is not None:
                setattr(parent, name, converted)
    return model


def _convert_timm_block(module: nn.Module, backend: Optional[str]) -> Optional[nn.Module]:
    """The vitkernels block replacing ``module`` if it is a timm Swin (V1 or V2) block or a V1
    PatchMerging, else None."""
    if _is_timm_swin_block(module):
        return swin_block_from_timm(module, backend)
    if _is_timm_swin_v2_block(module):
        return swin_v2_block_from_timm(module, backend)
    if _is_timm_patch_merging(module):
        return patch_merging_from_timm(module, backend)
    return None


def _is_timm_patch_merging(module: nn.Module) -> bool:
    from vitkernels.modules.swin import PatchMerging

    return (
        type(module).__name__ == "PatchMerging"
        and not isinstance(module, PatchMerging)
        and isinstance(getattr(module, "norm", None), nn.Module)
        and isinstance(getattr(module, "reduction", None), nn.Linear)
        and hasattr(module, "dim")
        # V1 normalises the 4C gathered channels before the reduction; timm's V2 PatchMerging (same class name)
        # reduces first and normalises the output
        and tuple(getattr(module.norm, "normalized_shape", ())) == (4 * module.dim,)
    )


def patch_merging_from_timm(merge: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """A :class:`vitkernels.PatchMerging` sharing a timm ``PatchMerging``'s norm and reduction."""
    from vitkernels.modules.swin import PatchMerging

    new = PatchMerging.__new__(PatchMerging)
    nn.Module.__init__(new)
    new.dim = merge.dim
    new.out_dim = getattr(merge, "out_dim", merge.reduction.out_features)
    new.norm = merge.norm
    new.reduction = merge.reduction
    new._backend = backend
    new.train(merge.training)
    return new


def _is_timm_swin_stage(module: nn.Module) -> bool:
    from vitkernels.modules.swin import SwinTransformerStage

    return (
        type(module).__name__ == "SwinTransformerStage"
        and not isinstance(module, SwinTransformerStage)
        and type(getattr(module, "blocks", None)) is nn.Sequential
        and isinstance(getattr(module, "downsample", None), nn.Module)
        and hasattr(module, "grad_checkpointing")
        and hasattr(module, "output_resolution")
        # the new stage would not carry hooks registered on the old one: leave such a stage alone
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                 or module._backward_pre_hooks)
    )


def stage_from_timm(stage: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """A :class:`vitkernels.SwinTransformerStage` sharing a timm ``SwinTransformerStage``'s ``downsample`` and
    ``blocks`` (the very modules: convert those first, as :func:`patch_model` does) and configuration."""
    from vitkernels.modules.swin import SwinTransformerStage

    new = SwinTransformerStage.__new__(SwinTransformerStage)
    nn.Module.__init__(new)
    for name in ("dim", "input_resolution", "output_resolution", "depth", "grad_checkpointing"):
        setattr(new, name, getattr(stage, name))
    if _timm_stage_floors_merged_resolution(stage):
        new.floor_merged_resolution = True
    new._backend = backend
    new.downsample = stage.downsample
    new.blocks = stage.blocks
    new.training = stage.training  # not .train(): the children keep their own modes
    return new


def _timm_stage_floors_merged_resolution(stage: nn.Module) -> bool:
    """Whether ``stage``'s timm gives its blocks floor(H / 2) after the merge (timm <= 1.0.29) rather than the
    merged map's ceil(H / 2) (timm >= 1.0.31). Told by the stage itself where its input is odd, else by a depth-0
    stage of its class built on a 3 x 3 input (cached per class); ceil where neither tells."""
    if not isinstance(stage.downsample, nn.Identity):
        for size, merged in zip(stage.input_resolution, stage.output_resolution):
            if size % 2:
                return merged == size // 2
    return _timm_stage_class_floors(type(stage))


@functools.lru_cache(maxsize=None)
def _timm_stage_class_floors(cls: type) -> bool:
    try:
        probe = cls(dim=1, out_dim=1, input_resolution=(3, 3), depth=0, downsample=True, num_heads=1, window_size=1)
        return tuple(probe.output_resolution) == (1, 1)
    except Exception:  # another constructor: keep the default
        return False


def _is_timm_swin_block(module: nn.Module) -> bool:
    from vitkernels.modules.swin import SwinTransformerBlock

    return (
        type(module).__name__ == "SwinTransformerBlock"
        and not isinstance(module, SwinTransformerBlock)
        and hasattr(module, "attn")
        and hasattr(module.attn, "relative_position_bias_table")
        and hasattr(module, "shift_size")
    )


def swin_block_from_timm(block: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """A :class:`vitkernels.SwinBlock` sharing ``block``'s submodules, configuration and buffers."""
    from vitkernels.modules.swin import SwinTransformerBlock

    new = SwinTransformerBlock.__new__(SwinTransformerBlock)
    nn.Module.__init__(new)
    for name in ("dim", "input_resolution", "target_shift_size", "always_partition", "dynamic_mask", "window_size",
                 "shift_size", "window_area", "mlp_ratio"):
        setattr(new, name, getattr(block, name))
    new._backend = backend
    new.norm1 = block.norm1
    new.attn = window_attention_from_timm(block.attn, backend)
    new.drop_path1 = block.drop_path1
    new.norm2 = block.norm2
    new.mlp = block.mlp
    new.drop_path2 = block.drop_path2
    new.register_buffer("attn_mask", block.attn_mask, persistent=False)
    new.train(block.training)
    return new


def window_attention_from_timm(attn: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """A :class:`vitkernels.WindowAttention` sharing a timm ``WindowAttention``'s parameters and buffers."""
    from vitkernels.modules.swin import WindowAttention

    new = WindowAttention.__new__(WindowAttention)
    nn.Module.__init__(new)
    for name in ("dim", "window_size", "window_area", "num_heads", "scale"):
        setattr(new, name, getattr(attn, name))
    new.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
    new.backend = backend
    new.relative_position_bias_table = attn.relative_position_bias_table
    new.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
    new.qkv = attn.qkv
    new.attn_drop = attn.attn_drop
    new.proj = attn.proj
    new.proj_drop = attn.proj_drop
    new.train(attn.training)
    return new


def _is_timm_swin_v2_block(module: nn.Module) -> bool:
    from vitkernels.modules.swin_v2 import SwinTransformerV2Block

    return (
        type(module).__name__ == "SwinTransformerV2Block"
        and not isinstance(module, SwinTransformerV2Block)
        and hasattr(module, "attn")
        and hasattr(module.attn, "cpb_mlp")
        and hasattr(module.attn, "logit_scale")
        and hasattr(module, "shift_size")
    )


def swin_v2_block_from_timm(block: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """A :class:`vitkernels.SwinV2Block` sharing a timm ``SwinTransformerV2Block``'s submodules, configuration and
    buffers (submodules registered in timm's order, so the state dict's key order is timm's too)."""
    from vitkernels.modules.swin_v2 import SwinTransformerV2Block

    new = SwinTransformerV2Block.__new__(SwinTransformerV2Block)
    nn.Module.__init__(new)
    for name in ("dim", "input_resolution", "num_heads", "target_shift_size", "always_partition", "dynamic_mask",
                 "window_size", "shift_size", "window_area", "mlp_ratio"):
        setattr(new, name, getattr(block, name))
    new._backend = backend
    new.attn = window_attention_v2_from_timm(block.attn, backend)
    new.norm1 = block.norm1
    new.drop_path1 = block.drop_path1
    new.mlp = block.mlp
    new.norm2 = block.norm2
    new.drop_path2 = block.drop_path2
    new.register_buffer("attn_mask", block.attn_mask, persistent=False)
    new.train(block.training)
    return new


def window_attention_v2_from_timm(attn: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """A :class:`vitkernels.WindowAttentionV2` sharing a timm V2 ``WindowAttention``'s parameters and buffers."""
    from vitkernels.modules.swin_v2 import WindowAttentionV2

    new = WindowAttentionV2.__new__(WindowAttentionV2)
    nn.Module.__init__(new)
    new.dim = attn.dim
    new.window_size = tuple(attn.window_size)
    new.pretrained_window_size = tuple(attn.pretrained_window_size)
    new.num_heads = attn.num_heads
    new.qkv_bias_separate = getattr(attn, "qkv_bias_separate", False)
    new.backend = backend
    new.logit_scale = attn.logit_scale
    new.cpb_mlp = attn.cpb_mlp
    new.qkv = attn.qkv
    new.q_bias = attn.q_bias
    new.register_buffer("k_bias", attn.k_bias, persistent=False)
    new.v_bias = attn.v_bias
    new.attn_drop = attn.attn_drop
    new.proj = attn.proj
    new.proj_drop = attn.proj_drop
    new.softmax = attn.softmax
    new.register_buffer("relative_coords_table", attn.relative_coords_table, persistent=False)
    new.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
    new.train(attn.training)
    return new


def convert_official_swin_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a microsoft/Swin-Transformer checkpoint's keys to timm's (and vitkernels') ``SwinTransformer`` keys.

    The official code downsamples at the *end* of a stage (``layers.i.downsample`` belongs to stage i + 1 here,
    where timm and vitkernels downsample at the start) and names the classifier ``head`` (``head.fc`` here); the
    ``relative_position_index`` / ``attn_mask`` buffers are dropped (non-persistent here). Accepts the raw file's
    dict (``{"model": ...}``) too. A checkpoint already in timm's layout is returned unchanged but for the buffers.
    """
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    official = "layers.0.downsample.reduction.weight" in state_dict
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if "relative_position_index" in key or "attn_mask" in key:
            continue
        if official:
            key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
            key = re.sub(r"^head\.", "head.fc.", key)
        out[key] = value
    return out


def __getattr__(name: str):
    """``FusedBlock`` / ``FusedPatchEmbed``: the fused classes of timm's ViT block and patch embedding, resolved on
    demand (for unpickling)."""
    return (_PATCH_EMBEDS if name == "FusedPatchEmbed" else _VIT_BLOCKS).resolve(name)
