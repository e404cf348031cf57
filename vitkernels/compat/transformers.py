"""Run Hugging Face ``transformers`` Swin models' window attention through vitkernels' fused op, and the ViT
family's layers through the fused CPU row ops, in place.

``patch_model(model)`` finds the Swin layers inside any model (``SwinModel``, ``SwinForImageClassification``,
``SwinForMaskedImageModeling``, ``SwinBackbone``, ``DonutSwinModel`` and the models built on it, e.g. Donut's
``VisionEncoderDecoderModel``; also ``MaskFormerSwinModel`` / ``MaskFormerSwinBackbone`` and CLAP's audio encoder,
which share Donut's layer) and switches each layer's class to a subclass whose ``forward`` computes the attention
branch as ``o_proj(window_attention(qkv(LN(x))))``: q, k, v from one matmul on the concatenated weights of the
three Linear layers, then the fused op on the unshifted, unpartitioned map -- no roll, partition, mask or bias
materialised. Nothing else changes: the same submodules and parameters (so state-dict keys, optimizers, weight
tying, hooks, ``from_pretrained`` / ``save_pretrained``), the same numbers (fp32 rel. error ~1e-6), and the layers
stay instances of their Hugging Face classes. ``unpatch_model`` restores the original classes.

Exactly the layer's semantics, including its quirks:

* the window and shift of ``set_shift_and_window_size`` (called as the layer does, it may shrink the window to the
  smaller side of the map and drop the shift, and keeps that for later calls), ``always_partition``;
* padding *before* the cyclic shift (``maybe_pad``; see :mod:`vitkernels.compat._window_attention`);
* maps smaller than the window, where the layer's shrunk window no longer matches its bias table (the layer then
  fails to broadcast), are left to the original code, which raises as before.

Calls the fused op cannot serve run the original code: attention weights requested (``output_attentions=True``, as
argument or config), ``head_mask`` (older layers), attention-probability dropout while training, an attention
implementation other than the built-in ``eager`` / ``sdpa``. The dropout after the output projection
(``hidden_dropout_prob`` / Donut's ``attention_probs_dropout_prob`` on the projected output) is applied in the
original token order: the same distribution as the unpatched layer's, not the same random mask.

Swin V2 layers (``Swinv2Model`` and the models on it, ``Swin2SRModel`` / ``Swin2SRForImageSuperResolution``, which
share the layer: scaled cosine attention, continuous position bias, residual post-norm) run on
``vitkernels.ops.window_attention_v2`` (issue 16) where that op exists; the continuous-position-bias MLP and the
logit-scale clamp stay in PyTorch around it. One difference in the last bits: ``Swinv2SelfAttention`` adds its
shifted-window mask twice (-200 across regions), the op adds -100 once; the two differ only by masked
probabilities of at most e^-100 relative to the unmasked ones, unless a head's scaled cosine plus bias spreads over
~100 (logit scale near its clamp of 100 and nearly parallel masked q, k). Without the op, the V2 layers are left as
they are and ``patch_model`` warns (:class:`NotPatchedWarning`).

The ViT family's pre-norm layers (transformers >= 5: ``ViTLayer`` and its copies in DeiT, ViT-MAE, ViT-MSN and
I-JEPA; ``Dinov2Layer`` and DINOv2-with-registers', with LayerScale) switch to :class:`_FusedViTLayer`: on CPU the
fused row ops of timm's ViT blocks (:func:`vitkernels.modules.vit.fused_block_cpu`), in inference and, where the
Linears run the layers' eager fast path (AMD CPUs), in training; for every call that path does not serve, the
layer's own code.

``transformers`` is imported only when needed (``pip install vitkernels[transformers]``).
"""
from __future__ import annotations

import functools
import inspect
import math
from itertools import islice
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
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
from vitkernels.compat._window_attention import (
    window_attention_pad_first,
    window_attention_v2_pad_first,
)
from vitkernels.modules.swin import (
    _fused_cpu_allowed,
    _gemm,
    _global_hooks,
    _has_hooks,
    _inactive,
    _is_layernorm,
    _linear_gelu,
    _linear_post_norm,
    _unblocked_mlp_without_fc2_bias,
)
from vitkernels.modules.patch_embed import patch_tokens, projection_served
from vitkernels.modules.vit import _training_pays, fused_block_cpu
from vitkernels.ops import bias_residual as bias_residual_op
from vitkernels.ops import bias_residual_layernorm as bias_residual_layernorm_op
from vitkernels.reference.patch_embed import grid_size

__all__ = ["NotPatchedWarning", "is_patched", "patch_model", "unpatch_model"]

# class name -> (module, layout). Only these classes are patched: each was read and is tested against the real
# package; a class of the same name elsewhere is not touched.
_LAYOUTS = {
    "SwinLayer": ("transformers.models.swin.modeling_swin", "swin"),
    "DonutSwinLayer": ("transformers.models.donut.modeling_donut_swin", "classic"),
    "MaskFormerSwinLayer": ("transformers.models.maskformer.modeling_maskformer_swin", "classic"),
    "ClapAudioLayer": ("transformers.models.clap.modeling_clap", "classic"),
    "Swinv2Layer": ("transformers.models.swinv2.modeling_swinv2", "v2"),
    "Swin2SRLayer": ("transformers.models.swin2sr.modeling_swin2sr", "v2"),
    # the ViT family's pre-norm layers (transformers >= 5: one layer class, copied per model)
    "ViTLayer": ("transformers.models.vit.modeling_vit", "vit"),
    "DeiTLayer": ("transformers.models.deit.modeling_deit", "vit"),
    "ViTMAELayer": ("transformers.models.vit_mae.modeling_vit_mae", "vit"),
    "ViTMSNLayer": ("transformers.models.vit_msn.modeling_vit_msn", "vit"),
    "IJepaLayer": ("transformers.models.ijepa.modeling_ijepa", "vit"),
    "Dinov2Layer": ("transformers.models.dinov2.modeling_dinov2", "dinov2"),
    "Dinov2WithRegistersLayer": ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
                                 "dinov2"),
}
# the arguments the patched forwards understand beyond (hidden_states, input_dimensions)
_KNOWN_ARGUMENTS = {"swin": {"always_partition", "kwargs"},
                    "classic": {"output_attentions", "always_partition", "head_mask"},
                    "v2": {"output_attentions", "head_mask"},
                    "vit": {"attention_mask", "kwargs"},
                    "dinov2": {"attention_mask", "kwargs"}}
# the arguments every patched forward starts with
_LEADING_ARGUMENTS = {"swin": ["self", "hidden_states", "input_dimensions"], "vit": ["self", "hidden_states"]}
_BUILTIN_ATTENTION = (None, "eager", "sdpa")


def _make_fused(cls: type):
    layout = _LAYOUTS[cls.__name__][1]
    params = list(inspect.signature(cls.forward).parameters)
    leading = _LEADING_ARGUMENTS["vit" if layout in ("vit", "dinov2") else "swin"]
    if params[:len(leading)] != leading:
        return f"unexpected {cls.__name__}.forward signature {params}"
    unknown = set(params[len(leading):]) - _KNOWN_ARGUMENTS[layout]
    if unknown:
        return f"{cls.__name__}.forward takes arguments the fused path does not know: {sorted(unknown)}"
    mixin = {"swin": _FusedSwinLayer, "classic": _FusedClassicSwinLayer, "v2": _FusedSwinV2Layer,
             "vit": _FusedViTLayer, "dinov2": _FusedViTLayer}[layout]
    return mixin, {"_vk_argument_names": tuple(params[len(leading):]), "_vk_layout": layout}


_FUSED = FusedClasses(__name__, {name: module for name, (module, _) in _LAYOUTS.items()}, _make_fused)


class _FusedSwinPatchEmbeddings(FusedModule):
    """The Swin family's patch embeddings (``SwinPatchEmbeddings`` and its copies) with the projection through the
    fused patch-embedding op where it serves the call (:func:`vitkernels.modules.patch_embed.projection_served`),
    the library's forward everywhere else: -> (tokens (B, L, D), (gh, gw)), the image zero-padded at the bottom /
    right to whole patches as ``maybe_pad`` does. The op writes the tokens as rows; the library's are a transposed
    view of the convolution's NCHW output, which the embeddings' LayerNorm copied first."""

    def forward(self, pixel_values):
        backend = self.vitkernels_backend
        if not projection_served(self.projection, self.patch_size, pixel_values, backend):
            return super().forward(pixel_values)
        height, width = pixel_values.shape[-2:]
        tokens = patch_tokens(pixel_values, self.projection, dynamic_img_pad=True, backend=backend)
        return tokens, grid_size(height, width, tuple(self.patch_size), dynamic_img_pad=True)


def _make_fused_patch_embeddings(cls: type):
    params = list(inspect.signature(cls.forward).parameters)
    if params != ["self", "pixel_values"] or not callable(getattr(cls, "maybe_pad", None)):
        return f"unexpected {cls.__name__}.forward signature {params}"
    return _FusedSwinPatchEmbeddings, {}


# The Swin family's patch embeddings, all one forward (maybe_pad, projection, flatten + transpose).
_PATCH_EMBEDDINGS = FusedClasses(__name__, {
    "SwinPatchEmbeddings": "transformers.models.swin.modeling_swin",
    "Swinv2PatchEmbeddings": "transformers.models.swinv2.modeling_swinv2",
    "DonutSwinPatchEmbeddings": "transformers.models.donut.modeling_donut_swin",
    "MaskFormerSwinPatchEmbeddings": "transformers.models.maskformer.modeling_maskformer_swin",
}, _make_fused_patch_embeddings)


def patch_model(model: nn.Module, backend: Optional[str] = None, linear: bool = True,
                embeddings: bool = True) -> nn.Module:
    """Switch every supported Swin layer inside ``model`` (or ``model`` itself) to the fused attention, in place;
    the Swin family's patch embeddings project through the fused patch-embedding op.

    ``backend`` is the op's backend (None: ``$VITKERNELS_BACKEND`` or ``auto``); it is stored on each layer as
    ``layer.vitkernels_backend`` and can be changed there. Layers that cannot be patched are listed in a
    :class:`NotPatchedWarning`. Patching twice is harmless (only the backend is updated). With ``linear=True``
    (default) the model's plain ``nn.Linear`` layers also become :class:`vitkernels.modules.Linear` (a class swap,
    :func:`vitkernels.compat._patching.patch_linears`; ``unpatch_model`` swaps them back). ``embeddings=False``
    leaves the patch embeddings on their convolution (as ``linear=False`` the Linears: each changes the rounding of
    the products). Returns ``model``.
    """

    def patch_one(module: nn.Module) -> Optional[str]:
        cls = type(module)
        if isinstance(module, FusedModule):
            module.vitkernels_backend = backend
            return None
        stem = embeddings and _PATCH_EMBEDDINGS.matches(cls)
        classes = _FUSED if _FUSED.matches(cls) else _PATCH_EMBEDDINGS if stem else None
        if classes is None:
            return None
        fused = classes.fused(cls)
        if isinstance(fused, str):
            return fused
        switch_class(module, fused, backend)
        return None

    patch_modules(model, patch_one, "vitkernels.compat.transformers.patch_model")
    if linear:  # the model's plain nn.Linear layers through vitkernels.linear (CPU float32: oneDNN)
        patch_linears(model, backend)
    return model


def __getattr__(name: str):
    """``FusedSwinLayer``, ``FusedSwinPatchEmbeddings`` etc.: the fused classes, resolved on demand (for
    unpickling)."""
    return (_PATCH_EMBEDDINGS if name.endswith("PatchEmbeddings") else _FUSED).resolve(name)


# --- the patched forwards ------------------------------------------------------------------------------------------

def _concat_qkv(query: nn.Linear, key: nn.Linear, value: nn.Linear):
    """Weight (3C', C) and bias (3C') or None of one Linear computing q, k, v (a missing bias is zeros)."""
    weight = torch.cat((query.weight, key.weight, value.weight))
    biases = (query.bias, key.bias, value.bias)
    if all(b is None for b in biases):
        return weight, None
    present = next(b for b in biases if b is not None)
    return weight, torch.cat([b if b is not None else present.new_zeros(present.shape) for b in biases])


def _window(layer: nn.Module, table_window) -> Optional[Tuple[int, int]]:
    """The layer's current (square) window if it is the one its bias table was built for, else None."""
    ws = layer.window_size
    if isinstance(ws, bool) or not isinstance(ws, int) or (ws, ws) != tuple(table_window):
        return None
    return ws, ws


def _attentions_requested(kwargs) -> bool:
    """transformers >= 5 collects attention weights with hooks (``capture_outputs``) or takes the keyword."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


class _FusedLayer(FusedModule):
    """Common base of the fused layer classes."""

    _vk_argument_names: Tuple[str, ...] = ()

    def _vk_call_served(self, x, kwargs) -> bool:
        """What a whole-layer fused path asks of every call: tokens (B, N, C) the fused CPU path takes, no keyword
        beyond the ignored ones, no submodule outputs collected, no global hooks and none on the layer's submodules
        (transformers' own output-capturing hooks are inactive unless the call collects their output, refused here)."""
        return (isinstance(x, torch.Tensor) and x.ndim == 3 and _fused_cpu_allowed(self.vitkernels_backend, x)
                and not _collecting_submodule_outputs()
                and not any(v is not None and v is not False for k, v in kwargs.items()
                            if k not in _IGNORED_LAYER_KWARGS)
                and not _global_hooks()
                and not any(_has_hooks(m, ignore=_output_capturing_hook) for m in islice(self.modules(), 1, None)))

    def _qkv_parameters(self, query, key, value):
        """:func:`_concat_qkv`, at every call. Not kept between calls: a weight updated through ``.data`` (the EMA
        teacher of DINO / MSN-style training: ``param.data.mul_(m).add_(...)``) does not bump its version counter,
        so no stamp of storage and version can tell a kept copy is stale (an earlier cache keyed on them served a
        stale teacher). The copy costs ~1-4% of a Swin-T inference step on CPU (26 MB of weights at Swin-T)."""
        return _concat_qkv(query, key, value)

    def _attention_branch(self, hidden_states, input_dimensions, query, key, value, table, table_window, num_heads,
                          scale):
        """(B, H, W, C) attention output before the output projection, or None if the window does not fit."""
        window = _window(self, table_window)
        if window is None:
            return None
        height, width = input_dimensions
        batch, _, channels = hidden_states.shape
        x = self.layernorm_before(hidden_states).view(batch, height, width, channels)
        weight, bias = self._qkv_parameters(query, key, value)
        shift = (int(self.shift_size),) * 2
        return window_attention_pad_first(x, weight, bias, table, window, shift, num_heads, scale,
                                          self.vitkernels_backend)


class _FusedSwinLayer(_FusedLayer):
    """transformers >= 5 ``SwinLayer``: ``attention.{q,k,v,o}_proj``, ``attention.relative_position_bias``, the
    attention function chosen by ``config._attn_implementation``; post-projection ``dropout``, ``mlp``.

    On CPU, where :meth:`_vk_fused_plan` serves the call, the whole layer runs fused: around the fused window
    attention, o_proj's bias + the residual + layernorm_after, fc1's bias + GELU and fc2's bias + the residual as
    the native row ops of timm's Swin blocks, with their autograd (grad mode on) or in place
    (:func:`vitkernels.modules.vit.fused_block_cpu`, grad mode off); otherwise the attention branch alone is fused
    and the rest is the layer's code."""

    def forward(self, hidden_states, input_dimensions, always_partition=False, **kwargs):
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        attention = self.attention
        position_bias = attention.relative_position_bias
        out = None
        if not (
            _attentions_requested(kwargs)
            or (self.training and attention.attention_dropout > 0.0)
            or getattr(attention.config, "_attn_implementation", None) not in _BUILTIN_ATTENTION
        ):
            approximate = self._vk_fused_plan(hidden_states, kwargs)
            if approximate is not None:
                return self._vk_forward_fused(hidden_states, input_dimensions, approximate), None
            out = self._attention_branch(
                hidden_states, input_dimensions, attention.q_proj, attention.k_proj, attention.v_proj,
                position_bias.relative_position_bias_table, position_bias.window_size,
                attention.num_attention_heads, attention.scaling,
            )
        if out is None:
            return super().forward(hidden_states, input_dimensions, always_partition, **kwargs)
        batch, length, channels = hidden_states.shape
        out = self.dropout(attention.o_proj(out)).reshape(batch, length, channels)
        hidden_states = hidden_states + self.drop_path(out)
        residual = hidden_states
        hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + residual
        return hidden_states, None

    def _vk_fused_plan(self, x, kwargs) -> Optional[str]:
        """GELU's ``approximate`` where the whole layer runs fused (class docstring) for this call, else None: CPU,
        the layer's window matching its bias table, inactive dropout and drop path (the layer's own draws are kept
        where they are active), LayerNorms, Linears and a GELU MLP of the layer's width, and the call checks of
        :meth:`_vk_call_served`."""
        if not self._vk_call_served(x, kwargs):
            return None
        attention, mlp, channels = self.attention, self.mlp, x.shape[-1]
        o, fc1, fc2 = attention.o_proj, getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        approximate = _gelu_approximate(getattr(mlp, "activation_fn", None))
        served = (
            approximate is not None
            and _window(self, attention.relative_position_bias.window_size) is not None
            and all(isinstance(m, nn.Linear) for m in (o, fc1, fc2))
            and o.in_features == o.out_features == channels and fc1.in_features == fc2.out_features == channels
            and fc1.bias is not None
            and _is_layernorm(self.layernorm_before, channels) and _is_layernorm(self.layernorm_after, channels)
            and _inactive(self.dropout) and _drop_path_inactive(self.drop_path)
        )
        return approximate if served else None

    def _vk_forward_fused(self, x, input_dimensions, approximate):
        attention, mlp = self.attention, self.mlp
        height, width = input_dimensions
        position_bias = attention.relative_position_bias
        if torch.is_grad_enabled():
            batch, length, channels = x.shape
            out = self._attention_branch(x, input_dimensions, attention.q_proj, attention.k_proj, attention.v_proj,
                                         position_bias.relative_position_bias_table, position_bias.window_size,
                                         attention.num_attention_heads, attention.scaling)
            o_proj, norm, fc1, fc2 = attention.o_proj, self.layernorm_after, mlp.fc1, mlp.fc2
            x1, a2 = bias_residual_layernorm_op.fused_bias_residual_layernorm(
                _gemm(out.reshape(batch, length, -1), o_proj.weight), o_proj.bias, x, None, norm.weight, norm.bias,
                norm.eps)
            y = _unblocked_mlp_without_fc2_bias(a2, fc1, fc2, approximate)
            return bias_residual_op.fused_bias_residual(y, fc2.bias, x1, None)
        weight, bias = self._qkv_parameters(attention.q_proj, attention.k_proj, attention.v_proj)
        window, shift = _window(self, position_bias.window_size), (int(self.shift_size),) * 2

        def attend(a):  # layernorm_before's output (B, L, C) -> the heads before o_proj (B, L, C)
            batch, length, channels = a.shape
            out = window_attention_pad_first(a.view(batch, height, width, channels), weight, bias,
                                             position_bias.relative_position_bias_table, window, shift,
                                             attention.num_attention_heads, attention.scaling,
                                             self.vitkernels_backend)
            return out.reshape(batch, length, -1)

        return fused_block_cpu(x, self.layernorm_before, attend, attention.o_proj, None, None, self.layernorm_after,
                               mlp.fc1, approximate, mlp.fc2, None, None)


class _FusedClassicSwinLayer(_FusedLayer):
    """``DonutSwinLayer`` (and the same layer in MaskFormer-Swin and CLAP audio): ``attention.self.{query,key,value}``
    with the bias table, ``attention.output.{dense,dropout}``, ``intermediate`` / ``output``."""

    def forward(self, hidden_states, input_dimensions, *args, **kwargs):
        options = dict(zip(self._vk_argument_names, args), **kwargs)
        if not options.get("always_partition") and hasattr(self, "set_shift_and_window_size"):
            self.set_shift_and_window_size(input_dimensions)
        attention = self.attention.self
        out = None
        if not (
            options.get("output_attentions")
            or options.get("head_mask") is not None
            or (self.training and attention.dropout.p > 0.0)
        ):
            out = self._attention_branch(
                hidden_states, input_dimensions, attention.query, attention.key, attention.value,
                attention.relative_position_bias_table, attention.window_size, attention.num_attention_heads,
                attention.attention_head_size ** -0.5,
            )
        if out is None:
            return super().forward(hidden_states, input_dimensions, *args, **kwargs)
        batch, length, channels = hidden_states.shape
        projection = self.attention.output
        out = projection.dropout(projection.dense(out)).reshape(batch, length, channels)
        hidden_states = hidden_states + self.drop_path(out)
        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        return (hidden_states + self.output(layer_output),)


class _FusedSwinV2Layer(_FusedLayer):
    """``Swinv2Layer`` / ``Swin2SRLayer``: attention on the raw map (post-norm), ``attention.self.{query,key,value}``
    (no key bias), ``logit_scale``, ``continuous_position_bias_mlp`` over ``relative_coords_table``; window and
    shift fixed at construction; ``x + drop_path(LN(attn))``, then ``x + drop_path(LN(MLP))``."""

    def forward(self, hidden_states, input_dimensions, *args, **kwargs):
        options = dict(zip(self._vk_argument_names, args), **kwargs)
        attention = self.attention.self
        if (
            options.get("output_attentions")
            or options.get("head_mask") is not None
            or (self.training and attention.dropout.p > 0.0)
            or _window(self, attention.window_size) is None
        ):
            return super().forward(hidden_states, input_dimensions, *args, **kwargs)
        height, width = input_dimensions
        batch, length, channels = hidden_states.shape
        heads = attention.num_attention_heads
        weight, bias = self._qkv_parameters(attention.query, attention.key, attention.value)
        bias_table = 16 * torch.sigmoid(
            attention.continuous_position_bias_mlp(attention.relative_coords_table).view(-1, heads))
        scale = torch.clamp(attention.logit_scale, max=math.log(1.0 / 0.01)).exp().view(heads)
        out = window_attention_v2_pad_first(
            hidden_states.view(batch, height, width, channels), weight, bias, bias_table, scale,
            (self.window_size,) * 2, (int(self.shift_size),) * 2, heads, self.vitkernels_backend,
        )
        projection = self.attention.output
        hidden_states = self._vk_post_norm(out.reshape(batch, length, channels), hidden_states, projection,
                                           lambda t: projection.dropout(projection.dense(t)), self.layernorm_before)
        h = self._vk_intermediate(hidden_states)
        return (self._vk_post_norm(h, hidden_states, self.output, self.output, self.layernorm_after),)

    def _vk_post_norm(self, x, residual, output, project, norm):
        """``residual + drop_path(norm(project(x)))``, ``project`` the dense layer and dropout of ``output`` (the
        attention's output projection, or the layer's ``Swinv2Output`` called as a module); on CPU with a biased
        dense layer, inactive dropout and drop path, a LayerNorm and no hooks or collected outputs: the dense layer
        without its bias, then bias + LayerNorm + residual as one native pass (:func:`_linear_post_norm`)."""
        dense, dropout = output.dense, output.dropout
        if (not isinstance(dense, nn.Linear) or dense.bias is None or not _is_layernorm(norm, residual.shape[-1])
                or not _inactive(dropout) or not _drop_path_inactive(self.drop_path)
                or not _fused_cpu_allowed(self.vitkernels_backend, x) or x.dtype not in (torch.float32, torch.float64)
                or _collecting_submodule_outputs() or _global_hooks()
                or any(_has_hooks(m, ignore=_output_capturing_hook) for m in (*output.modules(), norm,
                                                                               self.drop_path))):
            return residual + self.drop_path(norm(project(x)))
        return _linear_post_norm(x, dense, residual, norm)

    def _vk_intermediate(self, x):
        """``self.intermediate(x)``; on CPU with a GELU, a biased dense layer and no hooks or collected outputs:
        the dense layer without its bias, then bias + GELU as one native pass (in place without autograd)."""
        intermediate = self.intermediate
        dense = getattr(intermediate, "dense", None)
        approximate = _gelu_approximate(getattr(intermediate, "intermediate_act_fn", None))
        if (approximate is None or not isinstance(dense, nn.Linear) or dense.bias is None
                or not _fused_cpu_allowed(self.vitkernels_backend, x) or _collecting_submodule_outputs()
                or _global_hooks()
                or any(_has_hooks(m, ignore=_output_capturing_hook) for m in intermediate.modules())):
            return intermediate(x)
        return _linear_gelu(x, dense, approximate)


def _drop_path_inactive(drop_path: nn.Module) -> bool:
    """A layer's drop path that is the identity here: ``nn.Identity``, or a ``*DropPath`` with probability 0 or in
    eval mode."""
    return isinstance(drop_path, nn.Identity) or (type(drop_path).__name__.endswith("DropPath")
                                                  and (drop_path.drop_prob == 0.0 or not drop_path.training))


def _gelu_approximate(act: nn.Module) -> Optional[str]:
    """``approximate`` of a transformers GELU module computed by ``F.gelu`` (``"gelu"``: exact, ``"none"``;
    ``"gelu_pytorch_tanh"``: ``"tanh"``), else None (the Python formulas, ``gelu_new`` ...: not served)."""
    cls = type(act)
    if cls.__module__ != "transformers.activations":
        return None
    fn = getattr(act, "act", None)
    if cls.__name__ == "GELUActivation" and fn is F.gelu:
        return "none"
    if (cls.__name__ == "GELUTanh" and isinstance(fn, functools.partial) and fn.func is F.gelu and not fn.args
            and fn.keywords == {"approximate": "tanh"}):
        return "tanh"
    return None


def _layer_scale(ls: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A DINOv2 layer's ``<Model>LayerScale`` (``x * lambda1``): its (C,) ``lambda1`` if of ``x``'s dtype (another
    dtype would promote the layer's product, not the in-place one), else None."""
    cls = type(ls)
    gamma = getattr(ls, "lambda1", None)
    if (cls.__name__.endswith("LayerScale") and cls.__module__.startswith("transformers.models.")
            and isinstance(gamma, torch.Tensor) and gamma.shape == (x.shape[-1],) and gamma.dtype == x.dtype):
        return gamma
    return None


def _output_capturing_hook(hook) -> bool:
    """transformers' output-capturing forward hook: installed for good on the recordable modules (the layers, their
    attention) the first time a caller asks for hidden states or attention weights, and inactive unless the current
    call collects that output (:func:`_collecting_submodule_outputs`)."""
    return (getattr(hook, "__name__", None) == "output_capturing_hook"
            and getattr(hook, "__module__", None) == "transformers.utils.output_capturing")


def _collecting_submodule_outputs() -> bool:
    """Whether this call collects outputs other than the hidden states (which transformers records on the layers
    themselves, around the fused forward): attention weights, or any other submodule's output."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return False
    collected = _active_collector.get()
    return collected is not None and any(k not in ("hidden_states", "_hidden_states_layers") for k in collected)


_IGNORED_LAYER_KWARGS = ("output_hidden_states", "output_attentions")  # the latter read by _attentions_requested


class _FusedViTLayer(_FusedLayer):
    """transformers >= 5 ViT-family layer, pre-norm: ``ViTLayer`` (also DeiT, ViT-MAE, ViT-MSN, I-JEPA:
    ``layernorm_before`` / ``layernorm_after``, the hidden ``dropout``) and ``Dinov2Layer`` (also DINOv2 with
    registers: ``norm1`` / ``norm2``, ``layer_scale1`` / ``layer_scale2``, ``drop_path``); ``attention.{q,k,v,o}_proj``
    with the attention function of ``config._attn_implementation``, ``mlp.{fc1, activation_fn, fc2}``.

    On CPU it runs :func:`vitkernels.modules.vit.fused_block_cpu`, the fused row ops of timm's ViT blocks: q, k, v
    from one GEMM on the concatenated weights (concatenated per call), ATen's SDPA at the layer's ``scaling``, proj
    bias + residual + LayerNorm2, fc1 bias + GELU, fc2 bias + residual; LayerScale scales the branch's GEMM output.
    In inference (grad mode off) the row ops run in place on tensors the call created; with grad mode on (training)
    their functional variants with their backwards, where the Linears run the layers' eager fast path
    (:func:`vitkernels.modules.vit._training_pays`: oneDNN's or vitkernels' own GEMM, AMD CPUs; A/B on a 2-core Zen 3,
    ViT-S/16 b2 training step 1.016x the layer code, DINOv2-S/14 1.021x, medians of 40 paired rounds). Everything
    else runs the layer's own code: grad mode on where MKL is the CPU GEMM (Intel CPUs: the Hugging Face code and
    autograd graph unchanged), other devices or backends, an attention mask, attention weights requested, attention
    implementations other than ``eager`` / ``sdpa``, active dropouts or drop paths, other activations (``gelu_new``
    ...), the SwiGLU MLP, hooks on the layer's submodules (transformers' own output-capturing hooks aside: hidden
    states are served, attention weights are not) or global ones, float32 under autocast."""

    _vk_layout = "vit"

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        plan = self._vk_fused_plan(hidden_states, kwargs) if attention_mask is None else None
        if plan is not None:
            return self._vk_forward_fused(hidden_states, plan)
        return super().forward(hidden_states, attention_mask, **kwargs)

    def _vk_layout_parts(self, x: torch.Tensor):
        """(norm1, norm2, gamma1, gamma2) of the layer's layout (gammas None: no LayerScale), or None where its
        dropout / drop path is active or its LayerScale is not one the fused path knows."""
        if self._vk_layout == "vit":
            return (self.layernorm_before, self.layernorm_after, None, None) if _inactive(self.dropout) else None
        if not _drop_path_inactive(self.drop_path):
            return None
        gamma1, gamma2 = (_layer_scale(ls, x) for ls in (self.layer_scale1, self.layer_scale2))
        if gamma1 is None or gamma2 is None:
            return None
        return self.norm1, self.norm2, gamma1, gamma2

    def _vk_fused_plan(self, x, kwargs):
        """``(norm1, norm2, gamma1, gamma2, approximate)`` for :meth:`_vk_forward_fused` where the fused path serves
        this call (class docstring), else None."""
        if not self._vk_call_served(x, kwargs) or _attentions_requested(kwargs):
            return None
        attention, mlp, channels = self.attention, self.mlp, x.shape[-1]
        if torch.is_grad_enabled() and not _training_pays(attention.q_proj, x):
            return None
        if (getattr(attention.config, "_attn_implementation", None) not in _BUILTIN_ATTENTION
                or getattr(attention, "is_causal", False)
                or (self.training and attention.attention_dropout > 0.0)):
            return None
        q, k, v, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not all(isinstance(m, nn.Linear) for m in (q, k, v, o, fc1, fc2)):
            return None
        parts = self._vk_layout_parts(x)
        approximate = _gelu_approximate(getattr(mlp, "activation_fn", None))
        if parts is None or approximate is None:
            return None
        width = attention.num_attention_heads * attention.head_dim
        norm1, norm2 = parts[:2]
        served = (
            all(m.in_features == channels and m.out_features == width for m in (q, k, v))
            and o.in_features == width and o.out_features == channels
            and fc1.in_features == channels and fc2.out_features == channels and fc1.bias is not None
            and _is_layernorm(norm1, channels) and _is_layernorm(norm2, channels)
        )
        return (*parts, approximate) if served else None

    def _vk_forward_fused(self, x, plan):
        attention, mlp = self.attention, self.mlp
        heads, head_dim, scaling = attention.num_attention_heads, attention.head_dim, attention.scaling
        weight, bias = self._qkv_parameters(attention.q_proj, attention.k_proj, attention.v_proj)

        def attend(a):
            batch, length, _ = a.shape
            qkv = _gemm(a, weight, bias).view(batch, length, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling)
            return out.transpose(1, 2).reshape(batch, length, heads * head_dim)

        norm1, norm2, gamma1, gamma2, approximate = plan
        return fused_block_cpu(x, norm1, attend, attention.o_proj, gamma1, None, norm2, mlp.fc1, approximate, mlp.fc2,
                               gamma2, None)
