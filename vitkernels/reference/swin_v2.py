"""Reference Swin Transformer V2 modules, interchangeable with timm's.

Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022.
``WindowAttentionV2``, ``SwinTransformerV2Block`` (alias ``SwinV2Block``), ``PatchMergingV2`` and
``SwinTransformerV2Stage`` take the same constructor arguments as timm's ``WindowAttention``,
``SwinTransformerV2Block``, ``PatchMerging`` and ``SwinTransformerV2Stage`` of ``timm.models.swin_transformer_v2``,
hold the same parameters and buffers under the same state-dict keys (``k_bias``, ``relative_coords_table``,
``relative_position_index`` and ``attn_mask`` non-persistent), take NHWC input and compute the same numbers with the
same arithmetic.

What differs from V1 (:mod:`vitkernels.reference.swin`): cosine attention with a learned per-head ``logit_scale``,
a continuous position bias from the ``cpb_mlp`` over log-spaced coordinates (``16 * sigmoid``), q / v biases with a
zero k bias, residual post-norm (``x + norm1(attn(x))``), and patch merging that normalises after the reduction. The
window / shift clamping, the shifted-window mask, the partition and ``set_input_size`` are V1's (inherited).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels.reference import swin as swin_v1
from vitkernels.reference.layers import DropPath, Mlp, to_2tuple
from vitkernels.reference.window_attention import relative_position_bias, relative_position_index
from vitkernels.reference.window_attention_v2 import (
    continuous_position_bias_table,
    cosine_attention_in_windows,
    cosine_scale,
    relative_coords_table,
)

_int_or_tuple_2_t = Union[int, Tuple[int, int]]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


def _act_layer(act_layer: Union[str, Type[nn.Module]]) -> Type[nn.Module]:
    """timm's ``get_act_layer`` for the names Swin V2 uses (a class passes through)."""
    if isinstance(act_layer, str):
        if act_layer not in _ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {sorted(_ACTIVATIONS)} or an nn.Module class, got {act_layer!r}")
        return _ACTIVATIONS[act_layer]
    return act_layer


class WindowAttentionV2(nn.Module):
    """Window multi-head self-attention with scaled cosine attention and a continuous relative position bias
    (timm ``swin_transformer_v2.WindowAttention``).

    Input (B_, N, C) windows (B_ = batch * nW, N = wh * ww), optional (nW, N, N) additive mask; output (B_, N, C).
    """

    def __init__(
        self,
        dim: int,
        window_size: _int_or_tuple_2_t,
        num_heads: int,
        qkv_bias: bool = True,
        qkv_bias_separate: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: _int_or_tuple_2_t = (0, 0),
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.qkv_bias_separate = qkv_bias_separate
        self.logit_scale = nn.Parameter(torch.empty((num_heads, 1, 1), **dd))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True, **dd),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_heads, bias=False, **dd),
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(dim, **dd))
            self.register_buffer("k_bias", torch.empty(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.empty(dim, **dd))
        else:
            self.q_bias = None
            self.k_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        win_h, win_w = self.window_size
        self.register_buffer("relative_coords_table", torch.empty(1, 2 * win_h - 1, 2 * win_w - 1, 2, **dd),
                             persistent=False)
        self.register_buffer("relative_position_index",
                             torch.empty(win_h * win_w, win_h * win_w, device=device, dtype=torch.long),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, math.log(10))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
        self._init_buffers()

    def _init_buffers(self) -> None:
        if self.k_bias is not None:
            self.k_bias.zero_()
        weight = self.proj.weight
        self.relative_coords_table.copy_(
            relative_coords_table(self.window_size, self.pretrained_window_size, device=weight.device, dtype=weight.dtype)
        )
        self.relative_position_index.copy_(relative_position_index(*self.window_size, device=weight.device))

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_window_size(self, window_size: _int_or_tuple_2_t) -> None:
        """Change the window (timm ``WindowAttention.set_window_size``): the coordinate table and the index are
        rebuilt; the cpb MLP is continuous in the coordinates, so no parameter changes."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        table = self.relative_coords_table
        self.window_size = window_size
        self.register_buffer(
            "relative_coords_table",
            relative_coords_table(window_size, self.pretrained_window_size, device=table.device, dtype=table.dtype),
            persistent=False,
        )
        self.register_buffer("relative_position_index", relative_position_index(*window_size, device=table.device),
                             persistent=False)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        """(3C,) ``cat(q_bias, k_bias, v_bias)``, the qkv Linear's bias (None without one)."""
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, self.k_bias, self.v_bias))

    def project_qkv(self, x: torch.Tensor, qkv_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The qkv Linear with ``qkv_bias`` (timm: one ``F.linear``, or the Linear then ``+= bias`` when
        ``qkv_bias_separate``)."""
        if qkv_bias is None:
            return self.qkv(x)
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += qkv_bias
            return qkv
        return F.linear(x, weight=self.qkv.weight, bias=qkv_bias)

    def bias_table(self) -> torch.Tensor:
        """((2wh-1)(2ww-1), nH) continuous position bias table, ``16 * sigmoid(cpb_mlp(coords))``."""
        return continuous_position_bias_table(self.cpb_mlp, self.relative_coords_table, self.num_heads)

    def cosine_scale(self) -> torch.Tensor:
        """(nH,) ``exp(clamp(logit_scale, max=log(100)))``."""
        return cosine_scale(self.logit_scale)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv = self.project_qkv(x, self.qkv_bias())
        bias = relative_position_bias(self.bias_table(), self.relative_position_index)
        x = cosine_attention_in_windows(qkv, bias, self.cosine_scale(), mask, self.num_heads, self.attn_drop.p,
                                        self.training)
        x = self.proj(x)
        return self.proj_drop(x)


class SwinTransformerV2Block(swin_v1.SwinTransformerBlock):
    """Swin V2 block with residual post-norm: x + DropPath(LN(SW-MSA(x))), then x + DropPath(LN(MLP(x)))
    (timm ``SwinTransformerV2Block``). Input and output (B, H, W, C).

    Window / shift clamping, the shifted-window mask, the partition around the attention and ``set_input_size``
    are V1's (inherited from :class:`vitkernels.reference.swin.SwinTransformerBlock`).
    """

    def __init__(
        self,
        dim: int,
        input_resolution: _int_or_tuple_2_t,
        num_heads: int,
        window_size: _int_or_tuple_2_t = 7,
        shift_size: _int_or_tuple_2_t = 0,
        always_partition: bool = False,
        dynamic_mask: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Union[str, Type[nn.Module]] = "gelu",
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        pretrained_window_size: _int_or_tuple_2_t = 0,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)  # V1's constructor builds a pre-norm block: the V2 layout is built here
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.num_heads = num_heads
        self.target_shift_size = to_2tuple(shift_size)
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask
        self.window_size, self.shift_size = self._calc_window_shift(window_size, shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio
        self.attn = self._make_attention(
            dim, window_size=self.window_size, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
            proj_drop=proj_drop, pretrained_window_size=to_2tuple(pretrained_window_size), **dd,
        )
        self.norm1 = norm_layer(dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=_act_layer(act_layer),
                       drop=proj_drop, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.register_buffer("attn_mask", None, persistent=False)
        self._init_buffers()

    def _make_attention(self, dim, **kwargs) -> nn.Module:
        return WindowAttentionV2(dim, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(B, H, W, C)


SwinV2Block = SwinTransformerV2Block


class PatchMergingV2(nn.Module):
    """2x2 patch merging, V2 order: (B, H, W, C) -> Linear -> LN -> (B, ceil(H/2), ceil(W/2), out_dim)
    (timm ``swin_transformer_v2.PatchMerging``). Neighbours concatenated as V1 (odd H or W zero-padded)."""

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False, **dd)
        self.norm = norm_layer(self.out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        _, H, W, _ = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x))


class SwinTransformerV2Stage(swin_v1.SwinTransformerStage):
    """One Swin V2 stage: optional PatchMergingV2, then ``depth`` blocks alternating W-MSA / SW-MSA
    (timm ``SwinTransformerV2Stage``; ``blocks`` is an ``nn.ModuleList``). ``set_input_size`` is V1's."""

    block_cls: Type[SwinTransformerV2Block] = SwinTransformerV2Block
    merging_cls: Type[PatchMergingV2] = PatchMergingV2

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: _int_or_tuple_2_t,
        depth: int,
        num_heads: int,
        window_size: _int_or_tuple_2_t,
        always_partition: bool = False,
        dynamic_mask: bool = False,
        downsample: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[List[float], float] = 0.0,
        act_layer: Union[str, Type[nn.Module]] = "gelu",
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        pretrained_window_size: _int_or_tuple_2_t = 0,
        output_nchw: bool = False,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.output_resolution = (
            tuple((i + 1) // 2 for i in self.input_resolution) if downsample else self.input_resolution
        )
        self.depth = depth
        self.output_nchw = output_nchw
        self.grad_checkpointing = False
        window_size = to_2tuple(window_size)
        shift_size = tuple(w // 2 for w in window_size)
        if downsample:
            self.downsample = self.merging_cls(dim=dim, out_dim=out_dim, norm_layer=norm_layer, **dd)
        else:
            if dim != out_dim:
                raise ValueError(f"dim ({dim}) must equal out_dim ({out_dim}) without downsampling")
            self.downsample = nn.Identity()
        self.blocks = nn.ModuleList([
            self.block_cls(
                dim=out_dim, input_resolution=self.output_resolution, num_heads=num_heads, window_size=window_size,
                shift_size=0 if (i % 2 == 0) else shift_size, always_partition=always_partition,
                dynamic_mask=dynamic_mask, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                attn_drop=attn_drop, drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                act_layer=act_layer, norm_layer=norm_layer, pretrained_window_size=pretrained_window_size, **dd,
            )
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def _init_respostnorm(self) -> None:
        """timm's init of the residual post-norms: zero weight and bias (each block starts as the identity)."""
        for block in self.blocks:
            for norm in (block.norm1, block.norm2):
                nn.init.constant_(norm.bias, 0)
                nn.init.constant_(norm.weight, 0)
