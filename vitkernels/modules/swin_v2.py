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

from itertools import islice
from typing import Iterable, Optional

import torch
from torch import nn

from vitkernels.modules.swin import (
    _BackendAttribute,
    _drop_path_factors,
    _fusable_drop_path,
    _fusable_gelu_mlp,
    _fused_cpu_allowed,
    _gelu_approximate,
    _gemm,
    _global_hooks,
    _linear_post_norm,
    _has_hooks,
    _inactive,
    _is_layernorm,
    _post_norm,
    _unblocked_mlp_without_fc2_bias,
)
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

    def _attn(self, x: torch.Tensor, cpu_gemm: bool = False) -> torch.Tensor:
        """The attention branch before norm1; ``cpu_gemm``: the qkv projection as the fused CPU path's GEMM."""
        attn = self.attn
        if self._attn_dropout_active():
            return super()._attn(x)  # attention dropout: not fused
        return attn.proj_drop(attn.proj(self._attn_heads(x, cpu_gemm)))

    def _attn_dropout_active(self) -> bool:
        return self.training and self.attn.attn_drop.p > 0.0

    def _attn_heads(self, x: torch.Tensor, cpu_gemm: bool) -> torch.Tensor:
        """(B, H, W, C) -> the heads' outputs before proj, (B, H, W, C) in the original token order, by the fused
        op (no attention dropout)."""
        attn = self.attn
        qkv_bias = attn.qkv_bias()
        qkv = _gemm(x, attn.qkv.weight, qkv_bias) if cpu_gemm else attn.project_qkv(x, qkv_bias)
        return window_attention_v2(
            qkv, attn.bias_table(), attn.cosine_scale(), self.window_size, self.shift_size, attn.num_heads, qkv_bias,
            backend=self._backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            if self._fused_cpu_ready(x):
                return self._forward_fused(x)
            return super().forward(x)
        return self._forward_inference(x)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with autograd on the fused CPU path (:meth:`_fused_cpu_ready`): the Linears as the CPU
        GEMM (the qkv one too), fc1's bias + GELU as the native ``bias_gelu`` (or the whole MLP as
        ``gelu_mlp_eager``, the GELU in the own GEMM's epilogues: V1's ``_unblocked_mlp_without_fc2_bias``) and each
        post-norm seam, ``x + drop_path(norm(linear(h)))``, as the native ``bias_layernorm_residual`` after the
        Linear's GEMM without its bias (their backwards native too; drop path's per-sample factors drawn as timm
        draws them)."""
        B, H, W, C = x.shape
        ops = torch.ops.vitkernels
        attn, mlp, norm1, norm2 = self.attn, self.mlp, self.norm1, self.norm2
        if self._attn_dropout_active():
            x = x + self.drop_path1(norm1(self._attn(x)))
        else:
            y = _gemm(self._attn_heads(x, cpu_gemm=True), attn.proj.weight)
            x = ops.bias_layernorm_residual(y, attn.proj.bias, x, _drop_path_factors(self.drop_path1, x),
                                            norm1.weight, norm1.bias, norm1.eps)[0]
        x = x.reshape(B, -1, C)
        y = _unblocked_mlp_without_fc2_bias(x, mlp.fc1, mlp.fc2, _gelu_approximate(mlp.act))
        x = ops.bias_layernorm_residual(y, mlp.fc2.bias, x, _drop_path_factors(self.drop_path2, x), norm2.weight,
                                        norm2.bias, norm2.eps)[0]
        return x.reshape(B, H, W, C)

    def _fused_cpu_ready(self, x: torch.Tensor) -> bool:
        """The fused CPU path serves this call: the block's Linears as the CPU GEMM and fc1's bias + GELU as one
        native pass, each post-norm seam one native pass after its Linear's GEMM (native ops, CPU, float32 without
        autocast, timm's standard block: LayerNorm post-norms, a GELU MLP without a hidden norm, Linears, inactive
        dropouts, DropPath or Identity drop paths; no hooks on its submodules, which the fused path calls by their
        weights or not at all)."""
        attn, mlp, C = self.attn, self.mlp, x.shape[-1]
        return (
            x.dtype == torch.float32 and _fused_cpu_allowed(self._backend, x)
            and _is_layernorm(self.norm1, C) and _is_layernorm(self.norm2, C)
            and isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear) and not attn.qkv_bias_separate
            and _inactive(attn.proj_drop) and _fusable_gelu_mlp(mlp)
            and _fusable_drop_path(self.drop_path1) and _fusable_drop_path(self.drop_path2)
            and not _global_hooks() and not any(_has_hooks(m) for m in islice(self.modules(), 1, None))
        )

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode without autograd: the arithmetic of :meth:`forward` (x + y and y + x are the same float) with the
        residual adds and the MLP's GELU done in place on tensors this call created (on CPU each fresh large tensor
        is page-faulted in by the allocator; see V1's ``SwinTransformerBlock._forward_inference``). Not under
        autocast, where an in-place add would not promote as timm's out-of-place add does. On the fused CPU path
        (:meth:`_fused_cpu_ready`): :meth:`_forward_inference_fused`."""
        B, H, W, C = x.shape
        if self._fused_cpu_ready(x):
            return self._forward_inference_fused(x)
        y = self.drop_path1(self.norm1(self._attn(x)))  # drop path is the identity in eval mode
        x = y.add_(x).reshape(B, -1, C)
        mlp = self.mlp
        approximate = _gelu_approximate(mlp.act)
        if approximate is not None:
            h = torch.ops.aten.gelu_(mlp.fc1(x), approximate=approximate)
        else:
            h = mlp.act(mlp.fc1(x))
        z = self.drop_path2(self.norm2(mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h))))))
        return z.add_(x).reshape(B, H, W, C)

    def _forward_inference_fused(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_forward_inference` on the fused CPU path: each Linear as the CPU GEMM without its bias (the qkv
        one with its bias, which timm calls as ``F.linear``), then its bias + post-norm + residual
        (``bias_layernorm_residual_``) or bias + GELU (``bias_gelu_``; or the MLP as ``gelu_mlp_eager``, as in
        :meth:`_forward_fused`) in place on the GEMM's fresh output (eval mode: drop paths and dropouts are the
        identity)."""
        B, H, W, C = x.shape
        attn, mlp = self.attn, self.mlp
        x = _linear_post_norm(self._attn_heads(x, cpu_gemm=True), attn.proj, x, self.norm1).reshape(B, -1, C)
        y = _unblocked_mlp_without_fc2_bias(x, mlp.fc1, mlp.fc2, _gelu_approximate(mlp.act))
        return _post_norm(y, mlp.fc2, x, self.norm2).reshape(B, H, W, C)


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
