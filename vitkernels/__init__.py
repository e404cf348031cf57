"""vitkernels: fused Triton / C++ / CUDA kernels for Vision Transformers (ViT, DeiT, Swin, DINO, MAE, MSN).

Drop-in nn.Modules (same constructor, state dict and numbers as timm / the official code) backed by ops that pick a
backend per call (``triton`` on CUDA, ``native`` C++/OpenMP on CPU, ``reference`` PyTorch everywhere); see
:mod:`vitkernels.dispatch` and ``python -m vitkernels.info``.
"""
from vitkernels import dispatch, ops, reference
from vitkernels.dispatch import BackendUnavailableError
from vitkernels.modules.linear import Linear
from vitkernels.modules.losses import DINOLoss, MSNLoss
from vitkernels.modules.masking import MAEDecoderUnshuffle, MAELoss, MAEMasking, MSNPatchDrop
from vitkernels.modules.patch_embed import PatchEmbed, ViTEmbedding
from vitkernels.modules.swin import (
    PatchMerging,
    SwinBlock,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
)
from vitkernels.modules.swin_v2 import (
    PatchMergingV2,
    SwinTransformerV2Block,
    SwinTransformerV2Stage,
    SwinV2Block,
    WindowAttentionV2,
)
from vitkernels.ops.dino_loss import dino_center_update, dino_loss
from vitkernels.ops.linear import linear
from vitkernels.ops.mae_loss import mae_loss
from vitkernels.ops.masking import mae_unshuffle, msn_patch_drop, random_masking
from vitkernels.ops.masking import patchify as mae_patchify
from vitkernels.ops.masking import unpatchify as mae_unpatchify
from vitkernels.ops.msn_loss import msn_loss
from vitkernels.ops.patch_embed import patch_embed
from vitkernels.ops.window_attention import window_attention
from vitkernels.ops.window_attention_3d import window_attention_3d
from vitkernels.ops.window_attention_v2 import window_attention_v2
from vitkernels.ops.window_partition import window_partition, window_reverse

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DINOLoss",
    "Linear",
    "MAEDecoderUnshuffle",
    "MAELoss",
    "MAEMasking",
    "MSNLoss",
    "MSNPatchDrop",
    "PatchEmbed",
    "PatchMerging",
    "PatchMergingV2",
    "SwinBlock",
    "SwinTransformer",
    "SwinTransformerBlock",
    "SwinTransformerStage",
    "SwinTransformerV2Block",
    "SwinTransformerV2Stage",
    "SwinV2Block",
    "ViTEmbedding",
    "WindowAttention",
    "WindowAttentionV2",
    "dino_center_update",
    "dino_loss",
    "dispatch",
    "linear",
    "mae_loss",
    "mae_patchify",
    "mae_unpatchify",
    "mae_unshuffle",
    "msn_loss",
    "msn_patch_drop",
    "ops",
    "patch_embed",
    "random_masking",
    "reference",
    "window_attention",
    "window_attention_3d",
    "window_attention_v2",
    "window_partition",
    "window_reverse",
]
