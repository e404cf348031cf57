"""The fused CPU path of a ViT / DeiT transformer block: timm's ``vision_transformer.Block`` (DeiT, ViT, and the
official MAE code's encoder and decoder, which are built from it) with the Swin block's native row ops between its
GEMMs. :func:`vitkernels.compat.timm.patch_model` switches each such block's class to one whose ``forward`` runs
:func:`forward_fused_cpu` where :func:`fused_cpu_ready` says it can serve the call, and timm's code everywhere else.

timm's block (pre-norm, global attention over the N tokens, B x N rows of C channels):

    x1  = x + dp1 * ls1 * proj(SDPA(qkv(LayerNorm1(x))))
    out = x1 + dp2 * ls2 * fc2(gelu(fc1(LayerNorm2(x1))))

(ls1, ls2: LayerScale's per-channel gammas, DeiT III and DINOv2; absent in ViT, DeiT, MAE).

runs proj, fc1 and fc2 with their biases (``addmm``), then the residual add, LayerNorm2, GELU and the second residual
add each as a pass of its own over the (B, N, C) / (B, N, 4C) activations. Here the three Linears are plain GEMMs
and each bias goes where the next row op reads the GEMM's output anyway:

    a   = LayerNorm1(x)                                         (ATen)
    o   = SDPA(heads(a Wqkv^T + bqkv))                          (ATen: addmm, scaled_dot_product_attention)
    x1, a2 = x + dp1 * (o Wproj^T + bproj), LayerNorm2(x1)      (bias_residual_layernorm)
    h   = gelu(a2 W1^T + b1)                                    (bias_gelu)
    out = x1 + dp2 * (h W2^T + b2)                              (bias_residual)

With LayerScale the branch's GEMM keeps its bias (``addmm``, as timm) and is scaled in place by gamma, and the row op
adds no bias: ``x + dp * (gamma * (o Wproj^T + bproj))``, timm's products in timm's order. Where the Linears run
vitkernels' own GEMM (AVX2-only AMD CPUs) the MLP is one op, ``gelu_mlp_eager``: bias + GELU in fc1's GEMM epilogue
(and in the backward the GELU's derivative in the epilogue of the GEMM before it), fc2's bias in its GEMM with
LayerScale, else added by ``bias_residual``.

(dp1, dp2: the per-sample drop-path factors, drawn with timm's calls), the row ops in place on tensors the block
created (the attention output, the GEMM outputs): no fresh LayerNorm2, GELU or residual outputs, and ``addmm``'s
bias copies, the residual adds and the GELU make no passes of their own. The attention itself
stays ATen's ``scaled_dot_product_attention`` (timm's ``fused_attn`` path; with ``fused_attn`` off timm computes
the same softmax unfused, equal within float rounding).

In training (grad mode on) the same ops with their backwards (``bias_residual_layernorm``, the MLP op or
``bias_gelu``, ``bias_residual``) serve the block where its Linears run the layers' eager fast path, oneDNN's or
vitkernels' own GEMM (:func:`vitkernels.ops.linear.layer_linear_route` ``"onednn"``: float32, eager, AMD CPUs),
which timm's ``F.linear`` (MKL, on its generic code path off Intel CPUs) does not reach. Elsewhere (Intel CPUs: MKL
is the CPU GEMM, and the ops with their backwards measured no faster than timm's ATen ops: DeiT-S, batch 2, 2-core
Xeon, 0.98-1.00x; the GEMMs, SDPA and the GELU's backward are the step) a training call runs timm's code, numbers
and autograd graph unchanged.

Served: grad mode off (or on, as above), CPU tensors (B, N, C), backend ``auto`` or ``native``, the dtypes and
autocast cases of the Swin path (:func:`vitkernels.modules.swin._fused_cpu_allowed`: under CPU autocast only
bfloat16 blocks on a bfloat16 input; a ViT's residual stream is float32 there, as timm's position-embedding add
promotes it, so its blocks run timm's code), a block with timm's standard parts: ``nn.LayerNorm`` norms (not timm's
``fast_norm``), timm's ``Attention`` without q/k norms, attention-output norm or gate, timm's ``Mlp`` with a GELU,
fc1 with a bias, no hidden norm, dropouts inactive, timm's ``LayerScale`` (gamma of shape (C,)) or none, drop paths,
no attention mask, and no hooks on the block's submodules (they would not fire) nor global module hooks.
"""
from __future__ import annotations

from itertools import islice
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels.modules.swin import (
    _drop_path_factors,
    _fusable_drop_path,
    _fusable_gelu_mlp,
    _fused_cpu_allowed,
    _gelu_approximate,
    _gemm,
    _global_hooks,
    _has_hooks,
    _inactive,
    _is_layernorm,
    _unblocked_mlp,
    _unblocked_mlp_without_fc2_bias,
)
from vitkernels.ops import bias_residual as bias_residual_op
from vitkernels.ops import bias_residual_layernorm as bias_residual_layernorm_op
from vitkernels.ops import linear as linear_op


def fused_cpu_ready(block: nn.Module, x: torch.Tensor, backend=None) -> bool:
    """Whether :func:`forward_fused_cpu` serves ``block(x)`` (module docstring: the call, the backend, the block's
    parts), for a timm ``vision_transformer.Block`` ``block`` and tokens ``x`` (B, N, C)."""
    if x.ndim != 3 or not _fused_cpu_allowed(backend, x):
        return False
    attn, mlp, C = block.attn, block.mlp, x.shape[-1]
    if torch.is_grad_enabled() and not _training_pays(attn.qkv, x):
        return False
    norms_ok = all(_is_layernorm(n, C) and not getattr(n, "_fast_norm", False) for n in (block.norm1, block.norm2))
    return (
        norms_ok
        and type(attn).__name__ == "Attention" and isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)
        and attn.proj.out_features == C
        and isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        and isinstance(getattr(attn, "norm", None), (nn.Identity, type(None))) and getattr(attn, "gate", None) is None
        and _inactive(attn.attn_drop) and _inactive(attn.proj_drop)
        and _layer_scale_ok(block.ls1, x) and _layer_scale_ok(block.ls2, x)
        and type(mlp).__name__ == "Mlp" and _fusable_gelu_mlp(mlp) and mlp.fc1.bias is not None
        and mlp.fc2.out_features == C
        and _fusable_drop_path(block.drop_path1) and _fusable_drop_path(block.drop_path2)
        and not _global_hooks() and not any(_has_hooks(m) for m in islice(block.modules(), 1, None))
    )


def _training_pays(linear: nn.Linear, x: torch.Tensor) -> bool:
    """Whether the fused path serves a call with grad mode on (training): where the block's Linears run the layers'
    eager fast path (:func:`vitkernels.ops.linear.layer_linear_route` ``"onednn"``: float32, no autocast, not
    compiling, oneDNN as this machine's CPU GEMM, vitkernels' own GEMM where it takes the Linears: AMD CPUs), which
    timm's ``F.linear`` does not take (MKL, on its generic code path off Intel CPUs). Elsewhere (Intel CPUs: MKL is
    the CPU GEMM) the fused ops with their backwards measured no faster than timm's code (module docstring)."""
    return linear_op.layer_linear_route(x, linear.weight, linear.bias) == "onednn"


def _layer_scale_ok(ls: nn.Module, x: torch.Tensor) -> bool:
    """``ls`` is no LayerScale (``nn.Identity``) or timm's ``LayerScale`` (forward ``x * gamma``, in place or not)
    with a (C,) gamma of the tokens' dtype (another dtype would promote timm's product, not the in-place one)."""
    if isinstance(ls, nn.Identity):
        return True
    cls = type(ls)
    gamma = getattr(ls, "gamma", None)
    return (cls.__name__ == "LayerScale" and cls.__module__.startswith("timm.")
            and isinstance(gamma, torch.Tensor) and gamma.shape == (x.shape[-1],) and gamma.dtype == x.dtype)


def _gamma(ls: nn.Module):
    """LayerScale's gamma, or None for no LayerScale (``nn.Identity``)."""
    return None if isinstance(ls, nn.Identity) else ls.gamma


def _scaled(y: torch.Tensor, gamma: torch.Tensor, in_place: bool) -> torch.Tensor:
    """LayerScale's ``gamma * y`` on a fresh GEMM output ``y``: in place without autograd; out of place under it
    (the gradient of gamma reads ``y``)."""
    return y.mul_(gamma) if in_place else y * gamma


def _branch(gamma: Optional[torch.Tensor], x: torch.Tensor, linear: nn.Linear, in_place: bool):
    """A residual branch's output Linear before the row op that adds it: ``(x W^T, bias)`` for the row op to add
    the bias; with a LayerScale ``gamma``: ``(gamma * (x W^T + bias), None)``, timm's products in its order."""
    if gamma is None:
        return _gemm(x, linear.weight), linear.bias
    return _scaled(_gemm(x, linear.weight, linear.bias), gamma, in_place), None


def _mlp_branch(gamma: Optional[torch.Tensor], a2: torch.Tensor, fc1: nn.Linear, approximate: str, fc2: nn.Linear,
                in_place: bool):
    """The MLP branch before the row op that adds it, as :func:`_branch`: ``(gelu(a2 W1^T + b1) W2^T, b2)``, or
    with a LayerScale ``gamma`` ``(gamma * (gelu(a2 W1^T + b1) W2^T + b2), None)``
    (:func:`vitkernels.modules.swin._unblocked_mlp`: the GELU in the own GEMM's epilogues where the Linears run it)."""
    if gamma is None:
        return _unblocked_mlp_without_fc2_bias(a2, fc1, fc2, approximate), fc2.bias
    return _scaled(_unblocked_mlp(a2, fc1, fc2, approximate, fc2.bias), gamma, in_place), None


def _attention(attn: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """timm ``Attention``'s heads without its proj: (B, N, C) LayerNorm1 output -> (B, N, heads * head_dim)."""
    B, N, _ = a.shape
    qkv = _gemm(a, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)  # timm's fused_attn call: its default scale is head_dim ** -0.5
    return o.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)


def forward_fused_cpu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` through the fused CPU path (module docstring), without autograd (the caller has checked
    :func:`fused_cpu_ready`): the row ops in place on tensors this call created. ``x`` is only read."""
    attn, mlp = block.attn, block.mlp
    return fused_block_cpu(x, block.norm1, lambda a: _attention(attn, a), attn.proj, _gamma(block.ls1),
                           block.drop_path1, block.norm2, mlp.fc1, _gelu_approximate(mlp.act), mlp.fc2,
                           _gamma(block.ls2), block.drop_path2)


def fused_block_cpu(
    x: torch.Tensor,
    norm1: nn.LayerNorm,
    attend: Callable[[torch.Tensor], torch.Tensor],
    proj: nn.Linear,
    gamma1: Optional[torch.Tensor],
    drop_path1: Optional[nn.Module],
    norm2: nn.LayerNorm,
    fc1: nn.Linear,
    approximate: str,
    fc2: nn.Linear,
    gamma2: Optional[torch.Tensor],
    drop_path2: Optional[nn.Module],
) -> torch.Tensor:
    """A pre-norm ViT block on (B, N, C) tokens ``x``, as the module docstring computes it; shared by timm's block
    (:func:`forward_fused_cpu`) and the Hugging Face ViT-family layers (:mod:`vitkernels.compat.transformers`).
    ``attend``: LayerNorm1's output (B, N, C) -> the attention's heads before ``proj`` (B, N, C'), a fresh
    contiguous tensor; ``gamma1`` / ``gamma2``: LayerScale's (C,) gammas or None; ``drop_path1`` / ``drop_path2``:
    timm ``DropPath`` modules (their per-sample factors drawn with timm's calls) or None / ``nn.Identity``; fc1 has a
    bias, GELU's ``approximate`` is ``"none"`` or ``"tanh"``. Without autograd the row ops run in place on tensors
    this call created; with grad mode on (training) their functional variants with their backwards
    (``bias_residual_layernorm``, ``bias_residual``), the same numbers."""
    in_place = not torch.is_grad_enabled()
    a = F.layer_norm(x, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps)
    o = attend(a)
    y, proj_bias = _branch(gamma1, o, proj, in_place)
    factors1 = _drop_path_factors(drop_path1, x)
    if in_place:
        # LayerNorm2's output goes to the attention output's buffer, dead once proj has read it; a fresh one where
        # the heads' width is not C
        a2 = o if o.shape == y.shape else torch.empty_like(y)
        torch.ops.vitkernels.bias_residual_layernorm_(y, proj_bias, x, factors1, norm2.weight, norm2.bias, norm2.eps,
                                                      a2)  # y := x1, a2 := LayerNorm2(x1)
        x1 = y
    else:
        x1, a2 = bias_residual_layernorm_op.fused_bias_residual_layernorm(y, proj_bias, x, factors1, norm2.weight,
                                                                          norm2.bias, norm2.eps)
    out, fc2_bias = _mlp_branch(gamma2, a2, fc1, approximate, fc2, in_place)
    factors2 = _drop_path_factors(drop_path2, x1)
    if not in_place:
        return bias_residual_op.fused_bias_residual(out, fc2_bias, x1, factors2)
    torch.ops.vitkernels.bias_residual_(out, fc2_bias, x1, factors2)
    return out
