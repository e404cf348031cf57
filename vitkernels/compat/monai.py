"""Run the window attention of MONAI's ``SwinUNETR`` (and its ``SwinTransformer`` encoder) through vitkernels'
fused op, in place.

``patch_model(model)`` switches each ``monai.networks.nets.swin_unetr.SwinTransformerBlock`` -- 3D
(``spatial_dims=3``, the usual SwinUNETR) and 2D -- to a subclass whose ``forward_part1`` (the attention branch) is
``proj(window_attention(qkv(norm1(x))))`` on the unshifted, unpartitioned volume or map: no roll, partition, mask or
bias materialised, and no per-call mask rebuild. 3D blocks run :func:`vitkernels.ops.window_attention_3d.
window_attention_3d` (fused: the native kernel on CPU, the Triton kernels on GPUs; head dims the Triton kernels do
not take, e.g. feature_size 24's head_dim 8, fall back to the op's reference there), 2D blocks the 2D op. On CPU its
``forward_part2`` (the MLP branch) runs linear1 without its bias, then the bias + GELU as one native pass (in place
without autograd), where the ``MLPBlock`` has a GELU, a biased linear1, inactive dropouts and no hooks; where both
Linears run vitkernels' own GEMM (float32, AVX2-only AMD CPUs, feature_size >= 32:
:func:`vitkernels.ops.gelu_mlp.own_gemm_mlp`) the whole MLP is ``vitkernels::gelu_mlp_eager`` (``gelu_mlp_own``
under torch.compile), its bias + GELU (and in training their gradients) in the GEMMs' epilogues. The rest of the
block (residuals, drop path, ``use_checkpoint``) is MONAI's own code, and parameters, buffers and state-dict keys
are unchanged. Each ``BasicLayer`` (a stage) is switched too, so that it no longer builds the shifted-window
mask its fused blocks do not read (MONAI's ``compute_mask`` at every forward, tens of MB at 3D sizes): its blocks
get a deferred mask, built only for a block that runs MONAI's attention code. ``SwinUNETR(use_v2=True)`` has the
same (V1-style) window attention -- its "v2" adds residual conv blocks before the stages -- and is patched the same
way. ``unpatch_model`` restores the classes.

Exactly MONAI's semantics (see :mod:`vitkernels.reference.window_attention_3d`): the per-axis window shrink and shift
drop of ``get_window_size`` (per input size, at each call), zero padding *before* the cyclic shift (padded tokens
carry the qkv Linear's bias), mask -100. Where a window shrinks along the first axis only, MONAI's sliced
relative-position index is a standard index into a slice of the bias table, and the fused op gets that slice. Calls
it cannot serve exactly run MONAI's code: a window shrunk along a later axis (MONAI then gathers the bias with its
full-window index sliced to ``[:n, :n]``, which no bias table reproduces: e.g. a 3D volume with H or W <= the
window), attention dropout while training, a shifted block called without ``mask_matrix``. A shifted block called
with a mask assumes it is the mask MONAI's ``BasicLayer`` builds (``compute_mask``), which the op computes from
coordinates.

``monai`` (and ``einops``, which SwinUNETR needs) is imported only when needed (``pip install vitkernels[monai]``).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from vitkernels.compat._patching import (
    FusedClasses,
    FusedModule,
    NotPatchedWarning,
    is_patched,
    patch_linears,
    patch_modules,
    switch_class,
    unpatch_model,
)
from vitkernels.compat._window_attention import window_attention_pad_first
from vitkernels.modules.swin import (
    _fused_cpu_allowed,
    _gelu_approximate,
    _global_hooks,
    _has_hooks,
    _inactive,
    _linear_gelu,
)
from vitkernels.ops import gelu_mlp as _gelu_mlp_op
from vitkernels.ops.window_attention_3d import window_attention_3d
from vitkernels.reference.window_attention_3d import (
    effective_window_and_shift,
    monai_equivalent_table,
    padded_size_3d,
)

__all__ = ["NotPatchedWarning", "is_patched", "patch_model", "unpatch_model"]

_SWIN_UNETR = "monai.networks.nets.swin_unetr"
_BLOCKS = {"SwinTransformerBlock": _SWIN_UNETR, "BasicLayer": _SWIN_UNETR}


class _DeferredMask:
    """The shifted-window mask MONAI's ``BasicLayer`` passes its blocks (``compute_mask(dims, window, shift,
    device)``: (nW, N, N), -100 across regions), built only if a block falls back to MONAI's attention code: the
    fused op computes the mask from token coordinates. At 3D SwinUNETR sizes the mask is tens of MB per stage
    (nW x 343 x 343 floats) and MONAI rebuilds it at every forward: ~8% of a patched 64 x 64 x 32 inference on
    2 CPU cores."""

    __slots__ = ("_args", "_mask")

    def __init__(self, dims, window, shift, device):
        self._args = (dims, window, shift, device)
        self._mask = None

    def materialize(self):
        if self._mask is None:
            self._mask = sys.modules[_SWIN_UNETR].compute_mask(*self._args)  # imported: its classes are patched
        return self._mask


class _FusedSwinTransformerBlock(FusedModule):
    """MONAI ``SwinTransformerBlock`` (3D or 2D) with ``forward_part1`` on the fused op and ``forward_part2``'s bias
    + GELU as one native pass (module docstring)."""

    def forward_part1(self, x, mask_matrix):
        attn = self.attn
        dims = x.dim() - 2
        if dims == len(attn.window_size) and dims in (2, 3) and not (self.training and attn.attn_drop.p > 0.0):
            window, shift = effective_window_and_shift(x.shape[1:-1], self.window_size, self.shift_size)
            table = monai_equivalent_table(attn.relative_position_bias_table, attn.window_size, window)
            if table is not None and (mask_matrix is not None or not any(shift)):
                if dims == 3:  # the op pads before its shift itself; padded tokens get the qkv Linear's bias
                    out = window_attention_3d(attn.qkv(self.norm1(x)), table, window, shift, attn.num_heads,
                                              attn.scale, attn.qkv.bias, True, backend=self.vitkernels_backend)
                else:
                    out = window_attention_pad_first(self.norm1(x), attn.qkv.weight, attn.qkv.bias, table, window,
                                                     shift, attn.num_heads, attn.scale, self.vitkernels_backend)
                return attn.proj_drop(attn.proj(out))
        if isinstance(mask_matrix, _DeferredMask):
            mask_matrix = mask_matrix.materialize()
        return super().forward_part1(x, mask_matrix)

    def forward_part2(self, x):
        mlp = self.mlp
        approximate = _gelu_approximate(getattr(mlp, "fn", None))
        if (approximate is None or type(mlp).__name__ != "MLPBlock"
                or not _fused_cpu_allowed(self.vitkernels_backend, x)
                or not (isinstance(mlp.linear1, nn.Linear) and isinstance(mlp.linear2, nn.Linear))
                or mlp.linear1.bias is None or not (_inactive(mlp.drop1) and _inactive(mlp.drop2))
                or _global_hooks() or any(_has_hooks(m) for m in mlp.modules())):
            return super().forward_part2(x)
        a, fc1, fc2 = self.norm2(x), mlp.linear1, mlp.linear2
        y = _gelu_mlp_op.own_gemm_mlp(a, fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate)  # GELU in epilogues
        return self.drop_path(y if y is not None else fc2(_linear_gelu(a, fc1, approximate)))


class _FusedBasicLayer(FusedModule):
    """MONAI ``BasicLayer`` (one Swin stage) that hands its blocks a :class:`_DeferredMask` instead of building the
    shifted-window mask, when every block is a fused one without hooks (a hook would see the mask argument);
    otherwise, or for a Hyena stage, MONAI's forward. The same steps as MONAI's forward: the per-input window and
    shift (``get_window_size``'s), channels last, the blocks, the downsampling, channels first."""

    def forward(self, x):
        blocks = list(self.blocks)
        if (getattr(self, "use_hyena", False) or not isinstance(x, torch.Tensor) or x.dim() not in (4, 5)
                or len(self.window_size) != x.dim() - 2 or _global_hooks()
                or not all(isinstance(b, _FusedSwinTransformerBlock) and not _has_hooks(b) for b in blocks)):
            return super().forward(x)
        spatial = tuple(x.shape[2:])
        window, shift = effective_window_and_shift(spatial, self.window_size, self.shift_size)  # get_window_size
        mask = _DeferredMask(list(padded_size_3d(spatial, window)), window, shift, x.device)
        x = x.permute(0, *range(2, x.dim()), 1)  # b c (d) h w -> b (d) h w c, a view as einops' rearrange
        for block in blocks:
            x = block(x, mask)
        x = x.view(x.shape[0], *spatial, -1)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))


_FUSED = FusedClasses(__name__, _BLOCKS, lambda cls: (
    _FusedBasicLayer if cls.__name__ == "BasicLayer" else _FusedSwinTransformerBlock, {}))


def patch_model(model: nn.Module, backend: Optional[str] = None, linear: bool = True) -> nn.Module:
    """Switch every MONAI Swin block (3D or 2D) inside ``model`` (or ``model`` itself) to the fused attention, and
    every ``BasicLayer`` to one that builds its mask only where a block falls back to MONAI's code, in place.

    ``backend`` is the op's backend (None: ``$VITKERNELS_BACKEND`` or ``auto``), stored on each block as
    ``block.vitkernels_backend``. Patching twice is harmless (only the backend is updated). With ``linear=True``
    (default) the model's plain ``nn.Linear`` layers also become :class:`vitkernels.modules.Linear` (a class swap,
    :func:`vitkernels.compat._patching.patch_linears`; ``unpatch_model`` swaps them back). Returns ``model``.
    """

    def patch_one(module: nn.Module) -> Optional[str]:
        if isinstance(module, FusedModule):
            module.vitkernels_backend = backend
            return None
        if not _FUSED.matches(type(module)):
            return None
        if type(module).__name__ == "SwinTransformerBlock" and len(module.attn.window_size) not in (2, 3):
            return f"{len(module.attn.window_size)}D windows: only 2D and 3D Swin blocks have a fused attention"
        switch_class(module, _FUSED.fused(type(module)), backend)
        return None

    patch_modules(model, patch_one, "vitkernels.compat.monai.patch_model")
    if linear:  # the model's plain nn.Linear layers through vitkernels.linear (CPU float32: oneDNN)
        patch_linears(model, backend)
    return model


def __getattr__(name: str):
    """``FusedSwinTransformerBlock``: the fused class, resolved on demand (for unpickling)."""
    return _FUSED.resolve(name)
