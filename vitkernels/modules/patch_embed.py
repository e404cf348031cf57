"""Fast ViT / DeiT embedding modules on the fused :func:`vitkernels.patch_embed` op.

Same constructors, attributes and state dicts as :mod:`vitkernels.reference.patch_embed` (hence as timm's
``PatchEmbed`` and the embedding part of ``VisionTransformer`` / ``VisionTransformerDistilled``); the forward runs
the op (Triton on CUDA, reference elsewhere; see :mod:`vitkernels.dispatch`) instead of Conv2d + flatten + cat + add.

Under ``torch.autocast`` the image and the parameters are cast to the autocast dtype and the op runs in it, like the
convolution it replaces; the tokens are then returned in the dtype timm's ``_pos_embed`` gives them (its ``cat`` and
add promote the convolution's output to the fp32 of the prefix / position parameters), so a patched model keeps an
fp32 residual stream exactly as timm does. Without prefix tokens and position embedding the output stays in the
autocast dtype, like timm's ``PatchEmbed``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from vitkernels import dispatch
from vitkernels.modules.swin import _global_hooks, _has_hooks
from vitkernels.ops import patch_embed as ops
from vitkernels.reference import patch_embed as reference
from vitkernels.reference.layers import Format

__all__ = ["PatchEmbed", "ViTEmbedding", "embed", "patch_embed_forward", "projection_served"]


def _autocast(*tensors: Optional[torch.Tensor]):
    """Cast floating tensors to the autocast dtype where autocast is on for their device (as a conv would)."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _whole_patches(module: reference.PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """Without dynamic_img_pad, a stride-p conv ignores the incomplete last patch row / column: crop them (a view)."""
    if module.dynamic_img_pad:
        return x
    ph, pw = module.patch_size
    H, W = x.shape[-2:]
    if H % ph or W % pw:
        x = x[:, :, : H - H % ph, : W - W % pw]
    return x


def embed(
    module: reference.PatchEmbed,
    x: torch.Tensor,
    pos_embed_for_grid: Callable[[Tuple[int, int]], Optional[torch.Tensor]],
    prefix_tokens: Optional[torch.Tensor],
    no_embed_class: bool,
) -> torch.Tensor:
    """timm ``patch_embed`` + ``_pos_embed`` (without ``pos_drop``) through the fused op.

    Args:
        module: the patch embedding (its checks, ``proj`` and ``norm``; output format ignored: tokens are NLC).
        x: (B, C, H, W).
        pos_embed_for_grid: (gh, gw) -> the (1, N, D) position embedding to add, or None.
        prefix_tokens: (1, P, D) or None.
        no_embed_class: timm's flag.

    Returns:
        (B, P + L, D). With an embedding norm layer the norm sits between projection and position embedding, so
        the op computes the patch tokens and the position step runs after the norm.
    """
    module.check_input(x)
    x = _whole_patches(module, x)
    grid = module.dynamic_feat_size(tuple(x.shape[-2:]))
    pos = pos_embed_for_grid(grid)
    x, weight, bias = _autocast(x, module.proj.weight, module.proj.bias)
    if isinstance(module.norm, nn.Identity):
        # the output dtype timm gets: its cat / add promote the conv's output to the prefix / pos parameters' dtype
        out_dtype = _promoted(x.dtype, pos, prefix_tokens)
        pos_in, prefix_in = (t.to(x.dtype) if t is not None else None for t in (pos, prefix_tokens))
        out = ops.patch_embed(x, weight, bias, pos_in, prefix_in, no_embed_class, module.dynamic_img_pad)
        return out.to(out_dtype)
    tokens = module.norm(ops.patch_embed(x, weight, bias, dynamic_img_pad=module.dynamic_img_pad))
    dtype = _promoted(tokens.dtype, pos, prefix_tokens)
    pos, prefix_tokens = (t.to(dtype) if t is not None else None for t in (pos, prefix_tokens))
    return ops.pos_embed(tokens.to(dtype), pos, prefix_tokens, no_embed_class)


def patch_embed_forward(module: nn.Module, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """A timm-style ``PatchEmbed``'s forward through the fused op: ``module`` is a
    :class:`vitkernels.reference.patch_embed.PatchEmbed` or timm's own (the same attributes: ``img_size``,
    ``patch_size``, ``strict_img_size``, ``dynamic_img_pad``, ``flatten``, ``output_fmt``, ``proj``, ``norm``).

    x (B, C, H, W) -> ``norm(tokens)`` in the module's output layout, tokens[b, l] = patch_l @ W^T + bias. The op
    writes the tokens as (B, L, D) rows, so the NHWC layout (Swin) is a view of them: timm's permuted conv output
    made the norm copy it first. ``backend``: the op's (None: ``$VITKERNELS_BACKEND`` or auto).
    """
    error = reference.PatchEmbed.input_size_error(module, x)  # (not module.check_input: timm's has none)
    if error is not None:
        raise ValueError(error)
    x = _whole_patches(module, x)
    grid = reference.PatchEmbed.dynamic_feat_size(module, tuple(x.shape[-2:]))
    tokens = patch_tokens(x, module.proj, module.dynamic_img_pad, backend)
    if module.flatten or module.output_fmt == Format.NLC:
        return module.norm(tokens)
    return module.norm(reference.PatchEmbed.format_tokens(module, tokens, grid))


def projection_served(proj: nn.Module, patch_size: Tuple[int, int], x: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether the fused op may stand in for another library's patch projection ``proj`` on image ``x`` (B, C, H,
    W) -- the adapters' patched stems call it: a plain Conv2d with kernel = stride = ``patch_size``, no padding,
    dilation or groups and no hooks of its own (the op does not call it), ``x`` on its device with its channels and
    its dtype (or autocast; else the library's forward gives the library's error), and an implementation of the op
    for the call: with ``backend`` left to auto, CPU tensors where the native op runs (on GPUs the library's cuDNN
    convolution is kept: the Triton op has not been measured against it there); a pinned backend where it can serve
    the call (a model pinned to ``native`` for its CUDA attention kernels keeps its convolution: the native patch
    embedding is CPU-only)."""
    if type(proj) is not nn.Conv2d or x.ndim != 4 or x.shape[1] != proj.in_channels:
        return False
    patch = tuple(patch_size)
    if (tuple(proj.kernel_size) != patch or tuple(proj.stride) != patch or proj.padding not in ((0, 0), "valid")
            or tuple(proj.dilation) != (1, 1) or proj.groups != 1):
        return False
    if _global_hooks() or _has_hooks(proj):
        return False
    # (autocast asked about the devices the op runs on only: it raises for one it does not know, e.g. meta)
    weight, autocast = proj.weight, x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    if x.device != weight.device or (x.dtype != weight.dtype and not autocast):
        return False
    # the device and the dtype the op would run in (under autocast the autocast dtype, as the conv's): all that the
    # op's implementations check
    call = dispatch.Call(x.device, torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)
    name = dispatch.resolve_backend_name(backend)
    if name == "auto":
        return x.device.type == "cpu" and ops.embed_op.reasons(call)["native"] is None
    return ops.embed_op.reasons(call)[name] is None


def patch_tokens(x: torch.Tensor, proj: nn.Module, dynamic_img_pad: bool, backend: Optional[str] = None):
    """``proj``'s stride = kernel = patch convolution of image ``x`` (B, C, H, W) as (B, L, D) tokens through the
    op (under autocast in its dtype, as the convolution): tokens[b, l] = patch_l @ W^T + bias, L = gh * gw in
    row-major order; ``dynamic_img_pad``: the image zero-padded at the bottom / right to whole patches, else the
    incomplete patches dropped."""
    x, weight, bias = _autocast(x, proj.weight, proj.bias)
    return ops.patch_embed(x, weight, bias, dynamic_img_pad=dynamic_img_pad, backend=backend)


def _promoted(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> torch.dtype:
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class PatchEmbed(reference.PatchEmbed):
    """timm-compatible ``PatchEmbed`` (constructor, attributes, ``proj`` / ``norm`` state dict) on the fused op.

    Output as timm: (B, L, D) by default, else ``output_fmt`` (the NCHW / NCL outputs are transposed views of the
    op's (B, L, D) result, not contiguous copies).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_embed_forward(self, x)


class ViTEmbedding(reference.ViTEmbedding):
    """timm ViT / DeiT embedding stem (``patch_embed``, ``cls_token``, ``dist_token``, ``reg_token``, ``pos_embed``)
    as one fused op: (B, C, H, W) -> (B, P + L, D). Same constructor and state dict as
    :class:`vitkernels.reference.patch_embed.ViTEmbedding`; :meth:`from_timm` builds one from a timm model."""

    @staticmethod
    def patch_embed_class() -> type:
        return PatchEmbed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = embed(self.patch_embed, x, self.grid_pos_embed, self.prefix_tokens(), self.no_embed_class)
        return self.pos_drop(out)
