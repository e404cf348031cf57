"""vitkernels: fused Triton / C++ / CUDA kernels for Vision Transformers (ViT, DeiT, Swin, DINO, MAE, MSN).

Drop-in nn.Modules (same constructor, state dict and numbers as timm / the official code) backed by ops that pick a
backend per call (``triton`` on CUDA, ``native`` C++/OpenMP on CPU, ``reference`` PyTorch everywhere); see
:mod:`vitkernels.dispatch` and ``python -m vitkernels.info``.
"""
from vitkernels import dispatch, ops, reference
from vitkernels.dispatch import BackendUnavailableError
from vitkernels.ops.window_partition import window_partition, window_reverse
from vitkernels.ops.mae_loss import mae_loss
from vitkernels.ops.masking import mae_unshuffle, msn_patch_drop, patchify, random_masking, unpatchify
from vitkernels.modules.masking import MAEDecoderUnshuffle, MAELoss, MAEMasking, MSNPatchDrop

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MAEDecoderUnshuffle",
    "MAELoss",
    "MAEMasking",
    "MSNPatchDrop",
    "dispatch",
    "mae_loss",
    "mae_unshuffle",
    "msn_patch_drop",
    "ops",
    "patchify",
    "random_masking",
    "reference",
    "unpatchify",
    "window_partition",
    "window_reverse",
]
