"""Fast Swin modules: drop-in replacements for timm's ``SwinTransformerBlock``, ``WindowAttention``,
``SwinTransformerStage`` (same constructor, state-dict keys and numbers) whose attention runs through
:func:`vitkernels.ops.window_attention.window_attention`.

The block's attention branch becomes ``proj(window_attention(qkv(LN(x))))`` with the qkv Linear applied in the original
token order, so the fused backends never materialise the rolled, padded or partitioned image, the bias or the mask.
Each module takes an extra keyword ``backend`` (default ``None``: ``$VITKERNELS_BACKEND`` or ``auto``), also settable
later as the attribute ``module.backend``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from vitkernels.ops.window_attention import window_attention
from vitkernels.reference import swin as reference


def _check_heads(dim, num_heads, head_dim) -> None:
    """Constructor arguments of the attention: a clear error instead of timm's ZeroDivisionError (head_dim 0)."""
    for name, value in (("dim", dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        raise ValueError(f"head_dim must be a positive int or None, got {head_dim!r}")
    if head_dim is None and dim < num_heads:
        raise ValueError(f"head_dim = dim // num_heads = {dim} // {num_heads} is 0: pass fewer heads or head_dim")


def _check_tokens(x, shape: str, last: int) -> None:
    """``x`` is a tensor of the given layout, e.g. (B, H, W, C), whose last dimension is ``last``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    rank = shape.count(",") + 1
    if x.dim() != rank or x.shape[-1] != last:
        hint = ""
        if rank == 4 and x.dim() == 3:
            hint = ": got (B, L, C) tokens, reshape them to (B, H, W, C) first"
        elif rank == 4 and x.dim() == 4 and x.shape[1] == last:
            hint = ": this looks like NCHW, the block takes channels-last NHWC (x.permute(0, 2, 3, 1))"
        raise ValueError(f"x must have shape {shape} with C = {last}, got {tuple(x.shape)}{hint}")


class _BackendAttribute:
    """A ``backend`` attribute (``None``, ``"auto"``, ``"triton"``, ``"native"``, ``"reference"``) that is handed down
    to the submodules that call ops, so setting it on a model, stage or block switches everything below."""

    _backend: Optional[str] = None

    def _backend_children(self) -> Iterable[nn.Module]:
        return ()

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self._backend = value
        for child in self._backend_children():
            child.backend = value


class WindowAttention(reference.WindowAttention):
    """Drop-in for timm ``WindowAttention``: input (B_, N, C) windows, optional (nW, N, N) mask, output (B_, N, C).

    Without a mask each window is attended by the fused op (a window is a one-window image with no shift).
    An explicit mask, or attention dropout while training, takes the reference path, which supports both.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, *args, backend: Optional[str] = None,
                 **kwargs):
        _check_heads(dim, num_heads, head_dim)
        super().__init__(dim, num_heads, head_dim, *args, **kwargs)
        self.backend = backend

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_tokens(x, "(B_, N, C)", self.dim)
        if x.shape[1] != self.window_area:
            raise ValueError(f"x must hold N = {self.window_area} tokens per window, got shape {tuple(x.shape)}")
        if mask is not None or (self.training and self.attn_drop.p > 0.0):
            return super().forward(x, mask)
        B_, N, _ = x.shape
        wh, ww = self.window_size
        qkv = self.qkv(x).view(B_, wh, ww, -1)
        out = window_attention(
            qkv, self.relative_position_bias_table, self.window_size, 0, self.num_heads, self.scale,
            self.qkv.bias, backend=self.backend,
        )
        return self.proj_drop(self.proj(out.view(B_, N, -1)))


class SwinTransformerBlock(_BackendAttribute, reference.SwinTransformerBlock):
    """Drop-in for timm ``SwinTransformerBlock`` (input/output (B, H, W, C)) with fused shifted-window attention."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        self._backend = backend  # read by _make_attention during the base constructor
        super().__init__(*args, **kwargs)

    def _backend_children(self) -> Iterable[nn.Module]:
        return (self.attn,)

    def _make_attention(self, dim, **kwargs) -> nn.Module:
        return WindowAttention(dim, backend=self._backend, **kwargs)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        if self.training and attn.attn_drop.p > 0.0:
            return super()._attn(x)  # attention dropout: not fused
        out = window_attention(
            attn.qkv(x), attn.relative_position_bias_table, self.window_size, self.shift_size, attn.num_heads,
            attn.scale, attn.qkv.bias, backend=self._backend,
        )
        return attn.proj_drop(attn.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, "(B, H, W, C)", self.dim)
        if self.training or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return self._forward_inference(x)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode without autograd: the same arithmetic as :meth:`forward` (x + y and y + x are the same float),
        with the residual adds and the MLP's GELU done in place on tensors this call created. Fewer fresh large
        tensors: on CPU each one is page-faulted in by the allocator, which can cost as much as the op filling it.
        Not under autocast, where the out-of-place ops' type promotion (an fp32 residual plus a bf16 branch is fp32)
        would differ from an in-place add's (bf16)."""
        B, H, W, C = x.shape
        y = self.drop_path1(self._attn(self.norm1(x)))  # drop path is the identity in eval mode
        x = y.add_(x).reshape(B, H * W, C)
        mlp = self.mlp
        h = mlp.fc1(self.norm2(x))
        if type(mlp.act) is nn.GELU:
            h = torch.ops.aten.gelu_(h, approximate=mlp.act.approximate)
        else:
            h = mlp.act(h)
        z = self.drop_path2(mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h)))))
        return z.add_(x).reshape(B, H, W, C)


SwinBlock = SwinTransformerBlock
PatchMerging = reference.PatchMerging


class SwinTransformerStage(_BackendAttribute, reference.SwinTransformerStage):
    """Drop-in for timm ``SwinTransformerStage`` built from fast :class:`SwinTransformerBlock` s."""

    block_cls = SwinTransformerBlock

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _backend_children(self) -> Iterable[nn.Module]:
        return self.blocks


class SwinTransformer(_BackendAttribute, reference.SwinTransformer):
    """Drop-in for timm ``SwinTransformer`` (same constructor subset and state dict) built from fast stages."""

    stage_cls = SwinTransformerStage

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _backend_children(self) -> Iterable[nn.Module]:
        return self.layers
