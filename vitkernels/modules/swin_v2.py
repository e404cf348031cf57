"""Fast Swin V2 modules: drop-in replacements for timm's ``swin_transformer_v2`` ``WindowAttention``,
``SwinTransformerV2Block`` and ``SwinTransformerV2Stage`` (same constructor, state-dict keys and numbers) whose
attention runs through :func:`vitkernels.ops.window_attention_v2.window_attention_v2`.

The block's attention branch becomes ``norm1(proj(window_attention_v2(qkv(x), table, scale)))`` with the qkv Linear
applied in the original token order, so the fused backends never materialise the rolled, padded or partitioned image,
the (nH, N, N) bias or the mask. The cpb MLP (a few hundred rows), ``16 * sigmoid`` and ``exp(clamp(logit_scale))``
stay in PyTorch around the op. Each module takes an extra keyword ``backend`` (default ``None``:
``$VITKERNELS_BACKEND`` or ``auto``), also settable later as the attribute ``module.backend``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from vitkernels.modules.swin import _BackendAttribute
from vitkernels.ops.window_attention_v2 import window_attention_v2
from vitkernels.reference import swin_v2 as reference


class WindowAttentionV2(reference.WindowAttentionV2):
    """Drop-in for timm V2 ``WindowAttention``: input (B_, N, C) windows, optional (nW, N, N) mask, output (B_, N, C).

    Without a mask each window is attended by the fused op (a window is a one-window image with no shift).
    An explicit mask, or attention dropout while training, takes the reference path, which supports both.
    """

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None or (self.training and self.attn_drop.p > 0.0):
            return super().forward(x, mask)
        B_, N, _ = x.shape
        wh, ww = self.window_size
        qkv = self.project_qkv(x, self.qkv_bias()).view(B_, wh, ww, -1)
        # whole windows: no padded tokens, so the op needs no qkv_bias
        out = window_attention_v2(qkv, self.bias_table(), self.cosine_scale(), self.window_size, 0, self.num_heads,
                                  backend=self.backend)
        return self.proj_drop(self.proj(out.view(B_, N, -1)))


class SwinTransformerV2Block(_BackendAttribute, reference.SwinTransformerV2Block):
    """Drop-in for timm ``SwinTransformerV2Block`` (input/output (B, H, W, C)) with fused shifted-window attention."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        self._backend = backend  # read by _make_attention during the base constructor
        super().__init__(*args, **kwargs)

    def _backend_children(self) -> Iterable[nn.Module]:
        return (self.attn,)

    def _make_attention(self, dim, **kwargs) -> nn.Module:
        return WindowAttentionV2(dim, backend=self._backend, **kwargs)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        if self.training and attn.attn_drop.p > 0.0:
            return super()._attn(x)  # attention dropout: not fused
        qkv_bias = attn.qkv_bias()
        out = window_attention_v2(
            attn.project_qkv(x, qkv_bias), attn.bias_table(), attn.cosine_scale(), self.window_size, self.shift_size,
            attn.num_heads, qkv_bias, backend=self._backend,
        )
        return attn.proj_drop(attn.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return self._forward_inference(x)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode without autograd: the arithmetic of :meth:`forward` (x + y and y + x are the same float) with the
        residual adds and the MLP's GELU done in place on tensors this call created (on CPU each fresh large tensor
        is page-faulted in by the allocator; see V1's ``SwinTransformerBlock._forward_inference``). Not under
        autocast, where an in-place add would not promote as timm's out-of-place add does."""
        B, H, W, C = x.shape
        y = self.drop_path1(self.norm1(self._attn(x)))  # drop path is the identity in eval mode
        x = y.add_(x).reshape(B, -1, C)
        mlp = self.mlp
        h = mlp.fc1(x)
        if type(mlp.act) is nn.GELU:
            h = torch.ops.aten.gelu_(h, approximate=mlp.act.approximate)
        else:
            h = mlp.act(h)
        z = self.drop_path2(self.norm2(mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h))))))
        return z.add_(x).reshape(B, H, W, C)


SwinV2Block = SwinTransformerV2Block
PatchMergingV2 = reference.PatchMergingV2


class SwinTransformerV2Stage(_BackendAttribute, reference.SwinTransformerV2Stage):
    """Drop-in for timm ``SwinTransformerV2Stage`` built from fast :class:`SwinTransformerV2Block` s."""

    block_cls = SwinTransformerV2Block

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _backend_children(self) -> Iterable[nn.Module]:
        return self.blocks
