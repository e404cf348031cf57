"""Reference Swin Transformer modules, interchangeable with timm's.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
``WindowAttention``, ``SwinTransformerBlock`` (alias ``SwinBlock``), ``PatchMerging`` and ``SwinTransformerStage`` take
the same constructor arguments as timm's classes of the same names (``timm.models.swin_transformer``), hold the same
parameters and buffers under the same state-dict keys (``relative_position_index`` and ``attn_mask`` non-persistent),
take NHWC input, and compute the same numbers with the same arithmetic (timm's non-fused attention path).
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Tuple, Type, Union

import torch
from torch import nn

from vitkernels.reference.layers import DropPath, Mlp, to_2tuple
from vitkernels.reference.patch_embed import PatchEmbed
from vitkernels.reference.window_attention import (
    attention_in_windows,
    relative_position_bias,
    relative_position_index,
    shifted_window_mask,
)
from vitkernels.reference.window_partition import padded_size, window_partition, window_reverse

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


class WindowAttention(nn.Module):
    """Window multi-head self-attention (W-MSA / SW-MSA) with relative position bias (timm ``WindowAttention``).

    Input (B_, N, C) windows (B_ = batch * nW, N = wh * ww), optional (nW, N, N) additive mask; output (B_, N, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: Optional[int] = None,
        window_size: _int_or_tuple_2_t = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd))
        self.register_buffer(
            "relative_position_index", torch.empty(win_h * win_w, win_h * win_w, device=device, dtype=torch.long),
            persistent=False,
        )
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._init_buffers()

    def _init_buffers(self) -> None:
        self.relative_position_index.copy_(
            relative_position_index(*self.window_size, device=self.relative_position_index.device)
        )

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_window_size(self, window_size: _int_or_tuple_2_t) -> None:
        """Change the window (timm ``WindowAttention.set_window_size``): the bias table is resized with timm's
        ``resize_rel_pos_bias_table`` (BEiT's geometric interpolation), so the numbers stay timm's; the relative
        position index is rebuilt."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        try:
            from timm.layers import resize_rel_pos_bias_table
        except Exception as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "changing a Swin window resizes the relative position bias table with timm's "
                f"resize_rel_pos_bias_table, and timm is not importable ({type(exc).__name__}: {exc})"
            ) from exc
        # Called as the installed timm's own WindowAttention.set_window_size calls it. timm >= 1.0.31 passes the
        # old window (old_window_size=, needed for non-square windows); timm <= 1.0.29's function has no such
        # parameter and infers a square source window from the table size, so it is passed only when accepted.
        old_window_size = self.window_size
        extra = {}
        if "old_window_size" in inspect.signature(resize_rel_pos_bias_table).parameters:
            extra["old_window_size"] = old_window_size
        win_h, win_w = window_size
        table = self.relative_position_bias_table
        new_shape = ((2 * win_h - 1) * (2 * win_w - 1), self.num_heads)
        with torch.no_grad():
            resized = resize_rel_pos_bias_table(table, new_window_size=window_size, new_bias_shape=new_shape, **extra)
        if tuple(resized.shape) != new_shape:
            # timm <= 1.0.29 reads a non-square window's table as square and may hand it back unresized (e.g. window
            # (2, 3) -> (2, 2): 15 rows read as 3 x 3, "already" the size of (2, 2)'s 3 x 3); timm's model then indexes
            # the stale table. Refused here (module unchanged) rather than computing with it.
            raise ValueError(
                f"resizing the relative position bias table from window {old_window_size} to {window_size}: the "
                f"installed timm's resize_rel_pos_bias_table returned shape {tuple(resized.shape)}, not {new_shape} "
                "(timm <= 1.0.29 cannot resize a non-square window's table; timm >= 1.0.31 can)"
            )
        self.window_size = window_size
        self.window_area = win_h * win_w
        # The resized table is used as returned, as timm does: timm 1.0.31 returns the table's dtype, timm 1.0.29 an
        # interpolated table in float32 (a float64 / half model's attention then promotes as timm's own does).
        # requires_grad is kept as timm 1.0.31 keeps it (1.0.29 makes every resized table trainable); no numbers change.
        self.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)
        self.register_buffer(
            "relative_position_index", relative_position_index(win_h, win_w, device=table.device), persistent=False
        )

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """(1, nH, N, N) relative position bias."""
        return relative_position_bias(self.relative_position_bias_table, self.relative_position_index).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv = self.qkv(x)
        x = attention_in_windows(
            qkv, self._get_rel_pos_bias()[0], mask, self.num_heads, self.scale, self.attn_drop.p, self.training
        )
        x = self.proj(x)
        return self.proj_drop(x)


class SwinTransformerBlock(nn.Module):
    """Swin block: x + DropPath(SW-MSA(LN(x))), then x + DropPath(MLP(LN(x))) (timm ``SwinTransformerBlock``).

    Input and output (B, H, W, C). The window and shift are clamped to the input resolution unless
    ``always_partition``; H, W that are not multiples of the window are zero-padded after the shift.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: _int_or_tuple_2_t,
        num_heads: int = 4,
        head_dim: Optional[int] = None,
        window_size: _int_or_tuple_2_t = 7,
        shift_size: int = 0,
        always_partition: bool = False,
        dynamic_mask: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.target_shift_size = to_2tuple(shift_size)
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask
        self.window_size, self.shift_size = self._calc_window_shift(window_size, shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio

        self.norm1 = norm_layer(dim, **dd)
        self.attn = self._make_attention(
            dim, num_heads=num_heads, head_dim=head_dim, window_size=self.window_size, qkv_bias=qkv_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.register_buffer("attn_mask", None, persistent=False)
        self.reset_parameters()

    def _make_attention(self, dim, **kwargs) -> nn.Module:
        """The attention submodule; subclasses swap in a faster one with the same parameters."""
        return WindowAttention(dim, **kwargs)

    def reset_parameters(self) -> None:
        self._init_buffers()

    def _init_buffers(self) -> None:
        if not self.dynamic_mask:
            self.register_buffer(
                "attn_mask", self.get_attn_mask(device=self.norm1.weight.device, dtype=self.norm1.weight.dtype),
                persistent=False,
            )

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def get_attn_mask(
        self, x: Optional[torch.Tensor] = None, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
    ) -> Optional[torch.Tensor]:
        """(nW, N, N) shifted-window mask for the padded input ``x`` (or the configured resolution), None if no shift."""
        if not any(self.shift_size):
            return None
        if x is not None:
            Hp, Wp, device, dtype = x.shape[1], x.shape[2], x.device, x.dtype
        else:
            Hp, Wp = padded_size(*self.input_resolution, self.window_size)
        return shifted_window_mask(Hp, Wp, self.window_size, self.shift_size, device=device, dtype=dtype)

    def _calc_window_shift(self, target_window_size, target_shift_size=None) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        target_window_size = to_2tuple(target_window_size)
        if target_shift_size is None:
            target_shift_size = self.target_shift_size
            if any(target_shift_size):
                target_shift_size = (target_window_size[0] // 2, target_window_size[1] // 2)
        else:
            target_shift_size = to_2tuple(target_shift_size)
        if self.always_partition:
            return tuple(target_window_size), tuple(target_shift_size)
        window_size = [r if r <= w else w for r, w in zip(self.input_resolution, target_window_size)]
        shift_size = [0 if r <= w else s for r, w, s in zip(self.input_resolution, window_size, target_shift_size)]
        return tuple(window_size), tuple(shift_size)

    def set_input_size(
        self, feat_size: Tuple[int, int], window_size: _int_or_tuple_2_t, always_partition: Optional[bool] = None
    ) -> None:
        """New input resolution and target window (timm ``SwinTransformerBlock.set_input_size``): the window and
        shift are clamped again, the attention's window (and bias table) follow, the mask is rebuilt."""
        self.input_resolution = to_2tuple(feat_size)
        if always_partition is not None:
            self.always_partition = always_partition
        self.window_size, self.shift_size = self._calc_window_shift(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.attn.set_window_size(self.window_size)
        self._init_buffers()

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x_windows = window_partition(x, self.window_size, self.shift_size)
        if self.dynamic_mask:
            Hp, Wp = padded_size(H, W, self.window_size)
            attn_mask = shifted_window_mask(Hp, Wp, self.window_size, self.shift_size, device=x.device, dtype=x.dtype)
        else:
            attn_mask = self.attn_mask
        attn_windows = self.attn(x_windows, mask=attn_mask)
        return window_reverse(attn_windows, H, W, self.window_size, self.shift_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


SwinBlock = SwinTransformerBlock


class PatchMerging(nn.Module):
    """2x2 patch merging: (B, H, W, C) -> LN -> Linear -> (B, ceil(H/2), ceil(W/2), out_dim) (timm ``PatchMerging``).

    The 4 neighbours are concatenated in timm's order (x0, x1, x2, x3) = ((0,0), (1,0), (0,1), (1,1)); odd H or W is
    zero-padded first.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim, **dd)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        _, H, W, _ = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.norm(x)
        return self.reduction(x)


class SwinTransformerStage(nn.Module):
    """One Swin stage: optional PatchMerging, then ``depth`` blocks alternating W-MSA / SW-MSA (timm ``SwinTransformerStage``)."""

    block_cls: Type[SwinTransformerBlock] = SwinTransformerBlock
    merging_cls: Type[PatchMerging] = PatchMerging
    # The blocks' resolution after the 2x2 merge. PatchMerging zero-pads an odd H or W, so the merged map is
    # ceil(H / 2), as timm >= 1.0.31's stage says; timm <= 1.0.29's stage says floor(H / 2) (the window clamp of an odd
    # map then differs). compat.timm sets True on a stage it swaps into a timm model whose stages floor, so that
    # model's set_input_size picks the windows the unpatched model picks.
    floor_merged_resolution: bool = False

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        downsample: bool = True,
        num_heads: int = 4,
        head_dim: Optional[int] = None,
        window_size: _int_or_tuple_2_t = 7,
        always_partition: bool = False,
        dynamic_mask: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[List[float], float] = 0.0,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.output_resolution = (
            tuple((i + 1) // 2 for i in self.input_resolution) if downsample else self.input_resolution
        )
        self.depth = depth
        self.grad_checkpointing = False
        window_size = to_2tuple(window_size)
        shift_size = tuple(w // 2 for w in window_size)
        if downsample:
            self.downsample = self.merging_cls(dim=dim, out_dim=out_dim, norm_layer=norm_layer, **dd)
        else:
            if dim != out_dim:
                raise ValueError(f"dim ({dim}) must equal out_dim ({out_dim}) without downsampling")
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            self.block_cls(
                dim=out_dim, input_resolution=self.output_resolution, num_heads=num_heads, head_dim=head_dim,
                window_size=window_size, shift_size=0 if (i % 2 == 0) else shift_size,
                always_partition=always_partition, dynamic_mask=dynamic_mask, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path, norm_layer=norm_layer, **dd,
            )
            for i in range(depth)
        ])

    def set_input_size(
        self, feat_size: Tuple[int, int], window_size: _int_or_tuple_2_t, always_partition: Optional[bool] = None
    ) -> None:
        """New input resolution and window for every block (timm ``SwinTransformerStage.set_input_size``)."""
        self.input_resolution = to_2tuple(feat_size)
        if isinstance(self.downsample, nn.Identity):
            self.output_resolution = self.input_resolution
        elif self.floor_merged_resolution:
            self.output_resolution = tuple(i // 2 for i in self.input_resolution)
        else:
            self.output_resolution = tuple((i + 1) // 2 for i in self.input_resolution)
        for block in self.blocks:
            block.set_input_size(feat_size=self.output_resolution, window_size=window_size,
                                 always_partition=always_partition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_blocks(self.downsample(x))

    def _forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks on the downsampled ``x``, each through ``torch.utils.checkpoint`` when ``grad_checkpointing``."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)



class ClassifierHead(nn.Module):
    """Global average pool over (H, W) of NHWC features, dropout, Linear (timm ``ClassifierHead``, keys ``fc.*``)."""

    def __init__(self, in_features: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if pool_type not in ("avg", ""):
            raise ValueError(f"pool_type must be 'avg' or '', got {pool_type!r}")
        self.in_features = in_features
        self.num_features = in_features
        self.pool_type = pool_type
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool_type == "avg":
            x = x.mean(dim=(1, 2))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class SwinTransformer(nn.Module):
    """Swin Transformer classifier: PatchEmbed (NHWC) -> stages -> LayerNorm -> head (timm ``SwinTransformer``).

    Same constructor arguments (the commonly used subset), module names and state-dict keys as timm, so timm
    checkpoints (``swin_tiny_patch4_window7_224`` ...) load with ``load_state_dict``. Stage i > 0 starts with
    PatchMerging; stage i works at the patch grid halved i times (rounded up).
    """

    stage_cls: Type[SwinTransformerStage] = SwinTransformerStage

    def __init__(
        self,
        img_size: _int_or_tuple_2_t = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Tuple[int, ...] = (2, 2, 6, 2),
        num_heads: Tuple[int, ...] = (3, 6, 12, 24),
        head_dim: Optional[int] = None,
        window_size: _int_or_tuple_2_t = 7,
        always_partition: bool = False,
        strict_img_size: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        dims = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dims[0],
                                      norm_layer=norm_layer, strict_img_size=strict_img_size, output_fmt="NHWC", **dd)
        grid = self.patch_embed.grid_size
        windows = (window_size,) * self.num_layers if not isinstance(window_size, (list, tuple)) or (
            len(window_size) == 2 and not isinstance(window_size[0], (list, tuple))) else tuple(window_size)
        total = sum(depths)
        rates = torch.linspace(0, drop_path_rate, total).tolist()
        dpr = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(self.num_layers)]
        layers, in_dim, scale = [], dims[0], 1
        for i in range(self.num_layers):
            layers.append(self.stage_cls(
                dim=in_dim, out_dim=dims[i], input_resolution=((grid[0] + scale - 1) // scale, (grid[1] + scale - 1) // scale),
                depth=depths[i], downsample=i > 0, num_heads=num_heads[i], head_dim=head_dim,
                window_size=to_2tuple(windows[i]), always_partition=always_partition, dynamic_mask=not strict_img_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[i], norm_layer=norm_layer, **dd,
            ))
            in_dim = dims[i]
            if i > 0:
                scale *= 2
        self.layers = nn.Sequential(*layers)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H', W', num_features) NHWC features."""
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """timm's default ViT-style init: truncated normal (std 0.02) Linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
