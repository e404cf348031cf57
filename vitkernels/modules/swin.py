"""Fast Swin modules: drop-in replacements for timm's ``SwinTransformerBlock``, ``WindowAttention``,
``SwinTransformerStage`` (same constructor, state-dict keys and numbers) whose attention runs through
:func:`vitkernels.ops.window_attention.window_attention`.

The block's attention branch becomes ``proj(window_attention(qkv(LN(x))))`` with the qkv Linear applied in the original
token order, so the fused backends never materialise the rolled, padded or partitioned image, the bias or the mask.
Each module takes an extra keyword ``backend`` (default ``None``: ``$VITKERNELS_BACKEND`` or ``auto``), also settable
later as the attribute ``module.backend``.

On CPU with the native ops (backend ``auto`` or ``native``) the block runs every Linear as a plain GEMM and puts each
bias where the next fused op reads the GEMM's output anyway, so nothing but GEMMs and one pass of fused row ops
stands between them:

    a  = LayerNorm1(x)                                   (ATen; in a stage: given by the previous block)
    o  = window_attention_add_bias(a Wqkv^T, bqkv)       (the attention adds the qkv bias as it gathers)
    x1, a2 = x + dp1 * (o Wproj^T + bproj), LayerNorm2(x1)   (bias_residual_layernorm)
    h  = gelu(a2 W1^T + b1)                              (bias_gelu)
    out = x1 + dp2 * (h W2^T + b2)                       (bias_residual; the last block of a stage)
    out, a' = x1 + dp2 * (h W2^T + b2), LayerNorm1'(out) (bias_residual_layernorm; the other blocks of a stage)

(dp1, dp2: the per-sample drop-path factors, drawn as timm draws them). :class:`SwinTransformerStage` chains its
blocks: each but the last ends with the second tail, ``LayerNorm1'`` being the next block's ``norm1``, and the next
block starts from ``a'``, so no block but the first reads its input once more just to normalise it. A block called
alone, or a stage with hooks on its blocks or activation checkpointing, runs the first tail; a block with hooks on
its submodules (which the fused path calls by their weights), or with global module hooks, runs its modules, so
the hooks fire as in timm. In inference (no grad)
the row ops work in place on tensors the block created. Where the MLP's weights are small beside its activations
(stage 1 of Swin-T at batch >= 2; with ATen's GEMM as the CPU GEMM, or on an AVX2-only CPU) the MLP's two GEMMs
and bias + GELU run by blocks of rows (:func:`vitkernels.ops.gelu_mlp.gelu_mlp`), forward and backward, in
inference and training alike: the hidden activation stays in cache, and only fc1's output is kept for the
backward. Elsewhere, where the patched Linears run vitkernels' own GEMM (AVX2-only CPUs), the MLP's two GEMMs run
unblocked as one op with the bias + GELU in fc1's GEMM epilogue and the GELU's derivative (and b1's gradient) in the
epilogue of the backward's input-gradient GEMM (:func:`vitkernels.ops.gelu_mlp.eager_takes_it`; eager only): no
pass of its own over the hidden activation or its gradient.
Every Linear runs through :func:`vitkernels.ops.linear.layer_linear`: on CPU float32 that is this machine's CPU
GEMM (:data:`vitkernels.ops.linear.CPU_GEMM`: MKL's sgemm through ``F.linear`` on Intel CPUs, oneDNN's inner
product elsewhere, where MKL takes its slower generic code path). Patch merging's gather + LayerNorm is one op too
(:class:`PatchMerging`).

Under CPU autocast to bfloat16 the fused path serves blocks whose input is already bfloat16 (in a timm Swin, every
block: the patch embedding's convolution hands autocast's dtype on), with the float32 parameters as they are: the
GEMMs go through ``F.linear``, so autocast casts their operands exactly as for timm's Linears (on CPUs without bf16
instructions the same product through the float32 GEMM: :func:`vitkernels.ops.linear.autocast_linear`), and the row
ops read the bfloat16 activations beside the float32 bias / LayerNorm parameters, compute in float and write bfloat16,
as timm's LayerNorm does under autocast (its adds round to bfloat16 once per op; ours once per fused op). A float32
input under autocast (a block called alone on float32 tokens: timm keeps the residual stream float32 and only the
branches bfloat16) runs the unfused path, which reproduces those promotions.
"""
from __future__ import annotations

from itertools import islice
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels import _native, dispatch
from vitkernels.ops import bias_gelu as _bias_gelu_op  # noqa: F401  (registers the fake / autograd of the ops)
from vitkernels.ops import bias_layernorm_residual as _bias_layernorm_residual_op  # noqa: F401
from vitkernels.ops import bias_residual as _bias_residual_op
from vitkernels.ops import bias_residual_layernorm as _bias_residual_layernorm_op
from vitkernels.ops import gelu_mlp as _gelu_mlp_op
from vitkernels.ops import patch_merging as _patch_merging_op
from vitkernels.ops import linear as _linear_op
from vitkernels.ops._library import needs_grad
from vitkernels.ops import window_attention as _window_attention_op
from vitkernels.ops.window_attention import window_attention
from vitkernels.reference import swin as reference

# The native CPU ops the fused block and patch merging call directly (once _fused_cpu_allowed and the block's
# _fused_cpu_ready have checked the call and the module).
_FUSED_CPU_OPS = ("window_attention", "window_attention_add_bias", "bias_gelu", "bias_residual",
                  "bias_residual_layernorm", "patch_merging_norm")
_FUSED_CPU_AVAILABLE = _native.is_loaded() and all(_native.has_kernel(op, "CPU") for op in _FUSED_CPU_OPS)


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused CPU path's Linears: :func:`vitkernels.ops.linear.layer_linear`, the linear op with backend ``auto``
    (the CPU GEMM of :data:`vitkernels.ops.linear.CPU_GEMM` for float32, ``F.linear`` for the other dtypes the fused
    path takes), whatever backend pinned the path itself."""
    return _linear_op.layer_linear(x, weight, bias)


def _linear_gelu(x: torch.Tensor, linear: nn.Linear, approximate: str) -> torch.Tensor:
    """``gelu(linear(x))`` as the fused paths compute it: the Linear's GEMM without its bias (:func:`_gemm`), then
    bias + GELU as one native pass, ``bias_gelu`` (with its backward) under autograd, else ``bias_gelu_`` in place on
    the GEMM's fresh output; without a bias, ``F.gelu``."""
    h = _gemm(x, linear.weight)
    if linear.bias is None:
        return F.gelu(h, approximate=approximate)
    if torch.is_grad_enabled():
        return torch.ops.vitkernels.bias_gelu(h, linear.bias, approximate)
    torch.ops.vitkernels.bias_gelu_(h, linear.bias, approximate)
    return h


def _linear_post_norm(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``residual + norm(linear(x))`` (a res-post-norm seam, Swin V2's, its drop path the identity) as the fused paths
    compute it: the Linear's GEMM without its bias (:func:`_gemm`), then :func:`_post_norm`."""
    return _post_norm(_gemm(x, linear.weight), linear, residual, norm)


def _post_norm(y: torch.Tensor, linear: nn.Linear, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``residual + norm(y + linear.bias)`` for ``y`` a fresh GEMM output of ``linear`` without its bias: bias +
    LayerNorm + residual as one native pass, ``bias_layernorm_residual`` (with its backward) under autograd, else
    ``bias_layernorm_residual_`` in place on ``y``."""
    if torch.is_grad_enabled():
        return torch.ops.vitkernels.bias_layernorm_residual(y, linear.bias, residual, None, norm.weight, norm.bias,
                                                            norm.eps)[0]
    torch.ops.vitkernels.bias_layernorm_residual_(y, linear.bias, residual, None, norm.weight, norm.bias, norm.eps)
    return y


def _blocked_mlp_pays(a2: torch.Tensor, mlp: nn.Module) -> bool:
    """Whether the fused CPU path runs the MLP as the blocked native ``gelu_mlp`` (inference and training alike, so
    both keep the same numbers): on the CPUs where it pays beside this machine's CPU GEMM
    (:func:`vitkernels.ops.gelu_mlp.layers_take_it`: ATen's GEMM, or an AVX2-only CPU) and where ``gelu_mlp``'s
    ``auto`` would pick it (small weights, a large hidden activation: Swin-T stage 1 at batch >= 2)."""
    return (a2.dtype == torch.float32 and _gelu_mlp_op.layers_take_it()
            and _gelu_mlp_op.native_preferred(a2, mlp.fc1.weight, mlp.fc2.weight))


def _mlp_without_fc2_bias(a2: torch.Tensor, mlp: nn.Module, approximate: str) -> torch.Tensor:
    """``gelu(a2 W1^T + b1) W2^T``, the fused CPU path's MLP before fc2's bias (which the residual op after it adds):
    by blocks of rows where :func:`_blocked_mlp_pays`, else :func:`_unblocked_mlp_without_fc2_bias`. The choice
    depends on the shapes and the machine only, so inference and training take the same one (and give the same
    forward numbers)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    if _blocked_mlp_pays(a2, mlp):  # by blocks of rows, forward and backward (vitkernels/ops/gelu_mlp.py)
        return _gelu_mlp_op.run_native(a2, fc1.weight, fc1.bias, fc2.weight, None, approximate, 0)
    return _unblocked_mlp_without_fc2_bias(a2, fc1, fc2, approximate)


def _unblocked_mlp_without_fc2_bias(a2: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, approximate: str) -> torch.Tensor:
    """``gelu(a2 W1^T + b1) W2^T`` (:func:`_unblocked_mlp` without fc2's bias, which the caller's row op adds). The
    fused paths of the Swin V1 / V2 blocks, the Hugging Face Swin layers and the ViT blocks."""
    return _unblocked_mlp(a2, fc1, fc2, approximate, None)


def _unblocked_mlp(a2: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, approximate: str,
                   fc2_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu(a2 W1^T + b1) W2^T [+ fc2_bias]`` over all rows at once: bias + GELU, and in the backward the GELU's
    derivative and b1's gradient, in the own GEMM's epilogues where the Linears run it
    (:func:`vitkernels.ops.gelu_mlp.own_gemm_mlp`: ``gelu_mlp_eager`` in eager mode, ``gelu_mlp_own`` under
    torch.compile), else fc1's GEMM, bias + GELU as one row op (:func:`_linear_gelu`), fc2's GEMM (with
    ``fc2_bias``: the LayerScale ViT blocks, whose gamma scales fc2's biased output)."""
    y = _gelu_mlp_op.own_gemm_mlp(a2, fc1.weight, fc1.bias, fc2.weight, fc2_bias, approximate)
    return y if y is not None else _gemm(_linear_gelu(a2, fc1, approximate), fc2.weight, fc2_bias)


def _fused_cpu_allowed(backend: Optional[str], x: torch.Tensor) -> bool:
    """Whether the fused native CPU path may serve this call: CPU tensors, backend auto or native, and no autocast
    unless it is bfloat16 autocast on a bfloat16 input (module docstring: then every op of the block already runs
    in bfloat16 and the fused ops give timm's dtypes; with a float32 input timm's out-of-place adds promote the
    residual stream back to float32, which the fused ops would not reproduce)."""
    return (
        _FUSED_CPU_AVAILABLE
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and dispatch.resolve_backend_name(backend) in ("auto", "native")
        and (not torch.is_autocast_enabled("cpu")
             or (x.dtype == torch.bfloat16 and torch.get_autocast_dtype("cpu") == torch.bfloat16))
    )


def _is_layernorm(m: nn.Module, dim: int) -> bool:
    return isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dim,)


def _inactive(dropout: nn.Module) -> bool:
    """A dropout that is the identity here (p = 0 or eval mode)."""
    if isinstance(dropout, nn.Identity):
        return True
    return isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)


def _gelu_approximate(act: nn.Module) -> Optional[str]:
    """``approximate`` of a GELU module the fused ops compute: ``nn.GELU``'s own, timm's ``GELU`` (``F.gelu``:
    ``"none"``; timm's ``Mlp`` gets it from ``act_layer="gelu"``, Swin V2's default) and ``GELUTanh`` (``"tanh"``);
    None for anything else (not served)."""
    cls = type(act)
    if cls is nn.GELU:
        return act.approximate
    if cls.__module__ == "timm.layers.activations":
        return {"GELU": "none", "GELUTanh": "tanh"}.get(cls.__name__)
    return None


def _fusable_gelu_mlp(mlp: nn.Module) -> bool:
    """timm's ``Mlp`` as the fused paths compute it: Linears fc1 and fc2, a GELU (:func:`_gelu_approximate`), no
    hidden norm, dropouts inactive."""
    return (_gelu_approximate(mlp.act) is not None and isinstance(mlp.norm, nn.Identity)
            and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
            and _inactive(mlp.drop1) and _inactive(mlp.drop2))


def _fusable_drop_path(m: nn.Module) -> bool:
    """nn.Identity, or a DropPath (timm's or vitkernels') whose per-sample factor the fused ops can apply."""
    return isinstance(m, nn.Identity) or (hasattr(m, "drop_prob") and type(m).__name__ == "DropPath")


def _drop_path_factors(m: Optional[nn.Module], x: torch.Tensor) -> Optional[torch.Tensor]:
    """(B,) per-sample factors of a DropPath in training, drawn with timm's exact calls (so the random stream and
    the values match timm's ``x * random_tensor``); None when it is the identity (or None: no drop path)."""
    if m is None or isinstance(m, nn.Identity) or m.drop_prob == 0.0 or not m.training:
        return None
    keep = 1 - m.drop_prob
    factors = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and getattr(m, "scale_by_keep", True):
        factors.div_(keep)
    return factors.reshape(-1)


def _has_hooks(m: nn.Module, ignore: Optional[Callable[[Callable], bool]] = None) -> bool:
    """Forward (pre-)hooks or backward (pre-)hooks registered on ``m`` itself (FSDP2's ``fully_shard`` adds some);
    forward hooks for which ``ignore(hook)`` is true left out (an adapter's library's own hooks, inactive unless
    the call asks for them)."""
    forward_hooks = m._forward_hooks.values() if ignore is None else [h for h in m._forward_hooks.values()
                                                                     if not ignore(h)]
    return bool(forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    """Hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook`` ...)."""
    g = torch.nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


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
        if self._fused_cpu_ready(x):
            return self._forward_fused(x)[0]
        if self.training or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return self._forward_inference(x)

    def _fused_cpu_ready(self, x: torch.Tensor) -> bool:
        """The fused CPU path serves this call: native ops, CPU, and the block is timm's standard one (LayerNorms,
        GELU MLP without a hidden norm, Linears, drop paths, dropouts inactive) with no hooks on its submodules,
        which the fused path calls by their weights (hooks on the block itself, FSDP2's included, still run)."""
        if not _fused_cpu_allowed(self._backend, x):
            return False
        attn, mlp, C = self.attn, self.mlp, x.shape[-1]
        return (
            _is_layernorm(self.norm1, C) and _is_layernorm(self.norm2, C)
            and isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)
            and _inactive(attn.attn_drop) and _inactive(attn.proj_drop)
            and _fusable_gelu_mlp(mlp)
            and _fusable_drop_path(self.drop_path1) and _fusable_drop_path(self.drop_path2)
            and not _global_hooks() and not any(_has_hooks(m) for m in islice(self.modules(), 1, None))
        )

    def _forward_fused(
        self, x: torch.Tensor, a: Optional[torch.Tensor] = None, next_norm: Optional[nn.LayerNorm] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The fused CPU path (the caller has checked :meth:`_fused_cpu_ready`): :meth:`_forward_fused_cpu` with
        autograd, else its in-place twin; torch.compile keeps the in-place one too (its reinplacing pass runs the
        mutating ops in place, with no copies: measured faster than the functional graph).

        ``a``: ``LayerNorm1(x)`` when the previous block of a stage already computed it; ``next_norm``: the next
        block's ``norm1``, whose output on this block's output is then returned as well (see
        :meth:`SwinTransformerStage._forward_chained`). Returns ``(out, next_norm(out) or None)``.
        """
        if torch.is_grad_enabled():
            return self._forward_fused_cpu(x, a, next_norm)
        return self._forward_fused_cpu_inplace(x, a, next_norm)

    def _attention_fused_cpu(self, a: torch.Tensor) -> torch.Tensor:
        """Window attention of LayerNorm1's output ``a``: the qkv Linear as a plain GEMM, its bias added by the op."""
        attn = self.attn
        qkv = _gemm(a, attn.qkv.weight)
        window, shift, table = list(self.window_size), list(self.shift_size), attn.relative_position_bias_table
        # training: either op saves the softmax for its backward
        if attn.qkv.bias is None:
            out, _ = torch.ops.vitkernels.window_attention(
                qkv, table, None, window, shift, attn.num_heads, attn.scale, needs_grad(qkv, table),
            )
        else:
            out = _window_attention_op.fused_window_attention_add_bias(
                qkv, table, attn.qkv.bias, window, shift, attn.num_heads, attn.scale,
            )
        return out

    def _forward_fused_cpu(
        self, x: torch.Tensor, a: Optional[torch.Tensor] = None, next_norm: Optional[nn.LayerNorm] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block as GEMMs + fused native row ops (module docstring), with autograd and under torch.compile.
        ``a`` / ``next_norm`` / the returned pair: see :meth:`_forward_fused`."""
        attn, mlp, n1, n2 = self.attn, self.mlp, self.norm1, self.norm2
        if a is None:
            a = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
        o = self._attention_fused_cpu(a)
        x1, a2 = _bias_residual_layernorm_op.fused_bias_residual_layernorm(
            _gemm(o, attn.proj.weight), attn.proj.bias, x, _drop_path_factors(self.drop_path1, x), n2.weight,
            n2.bias, n2.eps,
        )
        y = _mlp_without_fc2_bias(a2, mlp, _gelu_approximate(mlp.act))
        factors = _drop_path_factors(self.drop_path2, x1)
        if next_norm is None:
            return _bias_residual_op.fused_bias_residual(y, mlp.fc2.bias, x1, factors), None
        out, a_next = _bias_residual_layernorm_op.fused_bias_residual_layernorm(
            y, mlp.fc2.bias, x1, factors, next_norm.weight, next_norm.bias, next_norm.eps
        )
        return out, a_next

    def _forward_fused_cpu_inplace(
        self, x: torch.Tensor, a: Optional[torch.Tensor] = None, next_norm: Optional[nn.LayerNorm] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`_forward_fused_cpu` without autograd: the same ops and GEMMs, in the same order (so the same
        numbers, bitwise), the row ops in place on tensors this call created (the attention output, the proj and
        MLP GEMM outputs). ``x`` and ``a`` are only read."""
        attn, mlp, n1, n2 = self.attn, self.mlp, self.norm1, self.norm2
        if a is None:
            a = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
        o = self._attention_fused_cpu(a)
        y = _gemm(o, attn.proj.weight)
        torch.ops.vitkernels.bias_residual_layernorm_(y, attn.proj.bias, x, _drop_path_factors(self.drop_path1, x),
                                                      n2.weight, n2.bias, n2.eps, o)  # y := x1, o := LayerNorm2(x1)
        x1, a2 = y, o
        out = _mlp_without_fc2_bias(a2, mlp, _gelu_approximate(mlp.act))  # fc2's bias: with the tail below
        factors = _drop_path_factors(self.drop_path2, x1)
        if next_norm is None:
            torch.ops.vitkernels.bias_residual_(out, mlp.fc2.bias, x1, factors)
            return out, None
        # a2 (o's buffer) is dead once fc1 has read it: it takes the next block's LayerNorm1
        torch.ops.vitkernels.bias_residual_layernorm_(out, mlp.fc2.bias, x1, factors, next_norm.weight,
                                                      next_norm.bias, next_norm.eps, o)  # out, o := next_norm(out)
        return out, o

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
        approximate = _gelu_approximate(mlp.act)
        if approximate is not None:
            h = torch.ops.aten.gelu_(h, approximate=approximate)
        else:
            h = mlp.act(h)
        z = self.drop_path2(mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h)))))
        return z.add_(x).reshape(B, H, W, C)


SwinBlock = SwinTransformerBlock


class PatchMerging(_BackendAttribute, reference.PatchMerging):
    """Drop-in for timm ``PatchMerging``: on CPU with the native ops, the 2x2 gather and the LayerNorm are one op
    (``patch_merging_norm``), then the reduction Linear; elsewhere the reference arithmetic."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if not (_fused_cpu_allowed(self._backend, x) and _is_layernorm(norm, 4 * x.shape[-1])
                and isinstance(self.reduction, nn.Linear)):
            return super().forward(x)
        merged = _patch_merging_op.fused_patch_merging_norm(x, norm.weight, norm.bias, norm.eps)
        return _gemm(merged, self.reduction.weight, self.reduction.bias)


class SwinTransformerStage(_BackendAttribute, reference.SwinTransformerStage):
    """Drop-in for timm ``SwinTransformerStage`` built from fast :class:`SwinTransformerBlock` s.

    On the fused CPU path the blocks are chained: each block's tail also computes the next block's LayerNorm1
    (module docstring); anything that :meth:`_chain_ready` refuses runs the blocks one by one as timm does.
    """

    block_cls = SwinTransformerBlock
    merging_cls = PatchMerging

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _backend_children(self) -> Iterable[nn.Module]:
        return [self.downsample, *self.blocks] if isinstance(self.downsample, PatchMerging) else self.blocks

    def _forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self._chain_ready(x):
            return self._forward_chained(x)
        return super()._forward_blocks(x)

    def _chain_ready(self, x: torch.Tensor) -> bool:
        """Whether the blocks may run chained on ``x`` (the downsampled input): two blocks or more, all this
        module's :class:`SwinTransformerBlock` (forward not overridden), each ``_fused_cpu_ready(x)``; no activation
        checkpointing in effect (it needs the block boundaries; without grad there is none); and no hooks on the
        blocks, their ``nn.Sequential`` or global ones, which the chain would skip since it never calls the blocks."""
        blocks = self.blocks
        if len(blocks) < 2 or (self.grad_checkpointing and torch.is_grad_enabled()):
            return False
        if type(blocks) is not nn.Sequential or _has_hooks(blocks) or _global_hooks():
            return False
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return False
        for block in blocks:
            if not (isinstance(block, SwinTransformerBlock) and type(block).forward is SwinTransformerBlock.forward
                    and x.shape[-1] == block.dim and not _has_hooks(block) and block._fused_cpu_ready(x)):
                return False
        return True

    def _forward_chained(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks with each block's last row op, ``bias_residual``, widened to ``bias_residual_layernorm`` with
        the next block's ``norm1``: one pass over the activations gives both the block's output and the next
        block's LayerNorm1 of it, which that block then takes instead of computing it. Same GEMMs, same drop-path
        draws in the same order as the blocks called one by one; only the LayerNorm1 of blocks 2.. is the fused
        op's instead of ATen's (a few float32 ulps apart)."""
        blocks = list(self.blocks)
        a = None
        for i, block in enumerate(blocks):
            next_norm = blocks[i + 1].norm1 if i + 1 < len(blocks) else None
            x, a = block._forward_fused(x, a, next_norm)
        return x


class SwinTransformer(_BackendAttribute, reference.SwinTransformer):
    """Drop-in for timm ``SwinTransformer`` (same constructor subset and state dict) built from fast stages."""

    stage_cls = SwinTransformerStage

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _backend_children(self) -> Iterable[nn.Module]:
        return self.layers
