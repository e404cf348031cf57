"""Op: ViT / DeiT patch embedding -- patchify + projection + bias + prefix-token concat + position embedding, fused.

Public functions:

* :func:`patch_embed` -- the whole embedding stem (timm ``PatchEmbed`` followed by ``_pos_embed``), dispatched to
  ``reference`` (:mod:`vitkernels.reference.patch_embed`: pad + reshape/permute patchify + matmul + cat + add),
  ``triton`` (``torch.ops.vitkernels.triton_patch_embed``: the implicit-im2col GEMM kernels of
  :mod:`vitkernels.triton.patch_embed`, with fake implementation and autograd) or ``native``
  (``torch.ops.vitkernels.patch_embed`` from ``csrc/cpu/patch_embed.cpp``: im2col + GEMMs with the bias / position
  embedding as the GEMM's accumulator input; same fake implementation and autograd).
* :func:`pos_embed` -- the ``_pos_embed`` step alone (prefix-token concat + position embedding) on given tokens;
  plain PyTorch, used where something (an embedding norm layer) sits between the projection and the position
  embedding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import check_same_device, check_same_dtype, check_tensor
from vitkernels.reference import patch_embed as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

embed_op = dispatch.op(
    "patch_embed", "patchify + GEMM + bias + prefix-token concat + pos-embed add (B,C,H,W)->(B,P+L,D)"
)


# --- public API ---------------------------------------------------------------------------------------------------

def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
    no_embed_class: bool = False,
    dynamic_img_pad: bool = False,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """ViT patch embedding with timm ``_pos_embed`` semantics, in one op.

    Args:
        x: (B, C, H, W) image. H, W must be multiples of the patch size unless ``dynamic_img_pad``.
        weight: (D, C, ph, pw), the Conv2d weight of timm's ``patch_embed.proj`` (kernel = stride = patch).
        bias: (D,) or None.
        pos_embed: (1, N, D) or (N, D), or None. N = P + L when ``no_embed_class`` is False (added after the
            concatenation, prefix rows included), N = L when True (added to the patch tokens only).
        prefix_tokens: (1, P, D) or (P, D), or None: CLS, then DeiT dist or register tokens, in timm's order.
        no_embed_class: timm's ``no_embed_class`` (DeiT III, big_vision, DINOv2-with-registers order).
        dynamic_img_pad: zero-pad the image bottom / right to whole patches (timm ``dynamic_img_pad``).
        backend: ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``; see :mod:`vitkernels.dispatch`.

    Returns:
        (B, P + L, D), L = gh * gw patches in row-major order:
        ``out[:, P + l] = patch_l @ W^T + bias (+ pos_embed[l or P + l])``,
        ``out[:, i < P] = prefix_tokens[i] (+ pos_embed[i] unless no_embed_class)``.
    """
    info = _check_args(x, weight, bias, pos_embed, prefix_tokens, no_embed_class, dynamic_img_pad)
    impl = embed_op.select(dispatch.Call(x.device, x.dtype, info), backend)
    # The implementations take pos_embed and prefix_tokens as (N, D) / (P, D) views (or None).
    pos = pos_embed.reshape(pos_embed.shape[-2], pos_embed.shape[-1]) if pos_embed is not None else None
    prefix = None
    if prefix_tokens is not None and prefix_tokens.shape[-2] > 0:
        prefix = prefix_tokens.reshape(prefix_tokens.shape[-2], prefix_tokens.shape[-1])
    return impl(x, weight, bias, pos, prefix, bool(no_embed_class), bool(dynamic_img_pad))


def pos_embed(
    tokens: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
    no_embed_class: bool = False,
) -> torch.Tensor:
    """timm's ``_pos_embed`` on (B, L, D) tokens: prefix concat and position embedding (shapes as :func:`patch_embed`).

    Returns (B, P + L, D). Plain PyTorch (a concatenation and an add); validated like :func:`patch_embed`.
    """
    check_tensor("tokens", tokens, ndim=3)
    _check_bool("no_embed_class", no_embed_class)
    D = tokens.shape[-1]
    P = _check_prefix(prefix_tokens, D)
    _check_pos(pos_embed, tokens.shape[1], P, D, no_embed_class)
    check_same_device(tokens=tokens, pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    check_same_dtype(tokens=tokens, pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    return reference.pos_embed(tokens, pos_embed, prefix_tokens, bool(no_embed_class))


# --- argument checks ----------------------------------------------------------------------------------------------

def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_prefix(prefix_tokens: Optional[torch.Tensor], dim: int) -> int:
    if prefix_tokens is None:
        return 0
    check_tensor("prefix_tokens", prefix_tokens, ndim=(2, 3))
    if prefix_tokens.dim() == 3 and prefix_tokens.shape[0] != 1:
        raise ValueError(f"prefix_tokens must have shape (1, P, D) or (P, D), got {tuple(prefix_tokens.shape)}")
    if prefix_tokens.shape[-1] != dim:
        raise ValueError(f"prefix_tokens must have D = {dim} channels, got shape {tuple(prefix_tokens.shape)}")
    return prefix_tokens.shape[-2]


def _check_pos(pos: Optional[torch.Tensor], num_patches: int, num_prefix: int, dim: int, no_embed_class: bool):
    if pos is None:
        return
    check_tensor("pos_embed", pos, ndim=(2, 3))
    if pos.dim() == 3 and pos.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, N, D) or (N, D), got {tuple(pos.shape)}")
    if pos.shape[-1] != dim:
        raise ValueError(f"pos_embed must have D = {dim} channels, got shape {tuple(pos.shape)}")
    want = num_patches if no_embed_class else num_patches + num_prefix
    if pos.shape[-2] != want:
        how = (
            f"the {num_patches} patch tokens (no_embed_class=True)" if no_embed_class
            else f"{num_prefix} prefix + {num_patches} patch tokens (no_embed_class=False)"
        )
        raise ValueError(f"pos_embed must have N = {want} rows for {how}, got shape {tuple(pos.shape)}")


def _check_args(x, weight, bias, pos, prefix, no_embed_class, dynamic_img_pad) -> dict:
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    _check_bool("no_embed_class", no_embed_class)
    _check_bool("dynamic_img_pad", dynamic_img_pad)
    B, C, H, W = x.shape
    D, Cw, ph, pw = weight.shape
    if Cw != C:
        raise ValueError(f"weight must have shape (D, C={C}, ph, pw) for x with {C} channels, got {tuple(weight.shape)}")
    if D == 0 or ph == 0 or pw == 0:
        raise ValueError(f"weight must have a non-empty shape (D, C, ph, pw), got {tuple(weight.shape)}")
    if C == 0 or H == 0 or W == 0:
        raise ValueError(f"x must have non-empty (C, H, W), got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != D:
            raise ValueError(f"bias must have shape (D,) = ({D},), got {tuple(bias.shape)}")
    if not dynamic_img_pad and (H % ph or W % pw):
        raise ValueError(
            f"x: image size ({H}, {W}) must be a multiple of the patch size ({ph}, {pw}) "
            f"(or pass dynamic_img_pad=True to zero-pad it)"
        )
    gh, gw = reference.grid_size(H, W, (ph, pw), dynamic_img_pad)
    P = _check_prefix(prefix, D)
    _check_pos(pos, gh * gw, P, D, no_embed_class)
    check_same_device(x=x, weight=weight, bias=bias, pos_embed=pos, prefix_tokens=prefix)
    check_same_dtype(x=x, weight=weight, bias=bias, pos_embed=pos, prefix_tokens=prefix)
    return {"patch_size": (ph, pw), "grid": (gh, gw), "embed_dim": D, "num_prefix": P}


def output_shape(x_shape, weight_shape, num_prefix: int, dynamic_img_pad: bool) -> Tuple[int, int, int]:
    """(B, P + L, D) for the given image / weight shapes."""
    gh, gw = reference.grid_size(x_shape[2], x_shape[3], tuple(weight_shape[2:]), dynamic_img_pad)
    return x_shape[0], num_prefix + gh * gw, weight_shape[0]


# --- reference backend --------------------------------------------------------------------------------------------

@embed_op.register("reference")
def _embed_reference(x, weight, bias, pos, prefix, no_embed_class, dynamic_img_pad):
    return reference.patch_embed(x, weight, bias, pos, prefix, no_embed_class, dynamic_img_pad)




# --- triton backend: vitkernels/triton/patch_embed.py -------------------------------------------------------------

def _embed_fake(x, weight, bias, pos, prefix, no_embed_class, dynamic_img_pad):
    return x.new_empty(output_shape(x.shape, weight.shape, 0 if prefix is None else prefix.shape[0], dynamic_img_pad))


def _embed_backward_fake(grad, x, weight, num_prefix, dynamic_img_pad, need_input, need_weight):
    grad_x = x.new_empty(x.shape) if need_input else x.new_empty((0,))
    grad_w = weight.new_empty(weight.shape) if need_weight else weight.new_empty((0,))
    return grad_x, grad_w


def _register_fake_and_autograd(forward, backward) -> None:
    """Fakes for both ops; autograd of ``forward`` through ``backward`` (image and weight gradients, two GEMMs) and
    batch sums of the output gradient's rows (bias, pos_embed and prefix-token gradients); and autograd of
    ``backward`` itself (second-order gradients), through the two ops again.

    The backward is bilinear: with G the patch rows of ``grad`` and A = im2col(x),
    ``grad_x = col2im(G W)`` and ``grad_w = sum_b G_b^T A_b``. Its adjoints, for incoming (gg_x, gg_w):
    ``d grad = [0 (prefix rows); im2col(gg_x) W^T + A gg_w^T]`` (two forward calls without bias),
    ``d x = col2im(G gg_w)`` and ``d weight = sum_b G_b^T im2col(gg_x)_b`` (two backward calls), so every order of
    gradient runs on the same kernels.
    """

    def setup_context(ctx, inputs, output):
        x, weight, bias, pos, prefix, no_embed_class, dynamic_img_pad = inputs
        ctx.save_for_backward(x, weight)
        ctx.num_prefix = 0 if prefix is None else prefix.shape[0]
        ctx.no_embed_class = no_embed_class
        ctx.dynamic_img_pad = dynamic_img_pad

    def backward_fn(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_bias, need_pos, need_prefix = ctx.needs_input_grad[:5]
        P = ctx.num_prefix
        grad_x = grad_w = grad_bias = grad_pos = grad_prefix = None
        if need_x or need_w:
            grad_x, grad_w = backward(grad.contiguous(), x, weight, P, ctx.dynamic_img_pad, need_x, need_w)
        if need_bias or need_pos or need_prefix:
            # (P + L, D): every row's gradient summed over B, in fp32 for half inputs
            acc_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
            rows = torch.sum(grad, dim=0, dtype=acc_dtype)
            if need_bias:
                grad_bias = rows[P:].sum(0).to(grad.dtype)
            if need_pos:
                grad_pos = (rows[P:] if ctx.no_embed_class else rows).to(grad.dtype)
            if need_prefix:
                grad_prefix = rows[:P].to(grad.dtype)
        return (grad_x if need_x else None, grad_w if need_w else None, grad_bias, grad_pos, grad_prefix, None, None)

    def backward_setup(ctx, inputs, output):
        grad, x, weight, ctx.num_prefix, ctx.dynamic_img_pad, ctx.need_input, ctx.need_weight = inputs
        ctx.save_for_backward(grad, x, weight)

    def backward_backward(ctx, gg_x, gg_w):
        grad, x, weight = ctx.saved_tensors
        need_grad, need_x, need_w = ctx.needs_input_grad[:3]
        P, dynamic_img_pad = ctx.num_prefix, ctx.dynamic_img_pad
        use_gg_x = ctx.need_input and gg_x is not None  # an output that was not asked for is an empty tensor
        use_gg_w = ctx.need_weight and gg_w is not None
        d_grad = d_x = d_w = None
        if need_grad and (use_gg_x or use_gg_w):
            rows = None
            if use_gg_x:
                rows = forward(gg_x.contiguous(), weight, None, None, None, False, dynamic_img_pad)
            if use_gg_w:
                from_w = forward(x, gg_w.contiguous(), None, None, None, False, dynamic_img_pad)
                rows = from_w if rows is None else rows + from_w
            d_grad = torch.nn.functional.pad(rows, (0, 0, P, 0))  # the prefix rows do not reach x or weight
        if need_x and use_gg_w:
            d_x = backward(grad, x, gg_w.contiguous(), P, dynamic_img_pad, True, False)[0]
        if need_w and use_gg_x:
            d_w = backward(grad, gg_x.contiguous(), weight, P, dynamic_img_pad, False, True)[1]
        return d_grad, d_x, d_w, None, None, None, None

    torch.library.register_fake(forward)(_embed_fake)
    torch.library.register_fake(backward)(_embed_backward_fake)
    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)
    torch.library.register_autograd(backward, backward_backward, setup_context=backward_setup)


if HAS_TRITON:
    from vitkernels.ops._library import kernel_op
    from vitkernels.triton import patch_embed as triton_kernels

    @kernel_op("vitkernels::triton_patch_embed")
    def triton_patch_embed(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        pos_embed: Optional[torch.Tensor],
        prefix_tokens: Optional[torch.Tensor],
        no_embed_class: bool,
        dynamic_img_pad: bool,
    ) -> torch.Tensor:
        return triton_kernels.patch_embed_fwd(x, weight, bias, pos_embed, prefix_tokens, no_embed_class, dynamic_img_pad)

    @kernel_op("vitkernels::triton_patch_embed_backward")
    def triton_patch_embed_backward(
        grad: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        num_prefix: int,
        dynamic_img_pad: bool,
        need_input: bool,
        need_weight: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return triton_kernels.patch_embed_bwd(grad, x, weight, num_prefix, dynamic_img_pad, need_input, need_weight)

    _register_fake_and_autograd(triton_patch_embed, triton_patch_embed_backward)

    embed_op.register(
        "triton",
        lambda call: triton_unavailable_reason(call.device),
        dispatch.dtypes_check(torch.float16, torch.bfloat16, torch.float32),
    )(triton_patch_embed)
else:
    embed_op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))


# --- native backend: csrc/cpu/patch_embed.cpp ---------------------------------------------------------------------

if _native.is_loaded():
    _register_fake_and_autograd(torch.ops.vitkernels.patch_embed.default, torch.ops.vitkernels.patch_embed_backward.default)

    @embed_op.register(
        "native",
        lambda call: _native.native_unavailable_reason("patch_embed", call.device),
        dispatch.dtypes_check(torch.float32, torch.float64, torch.bfloat16, torch.float16),
    )
    def _embed_native(x, weight, bias, pos, prefix, no_embed_class, dynamic_img_pad):
        return torch.ops.vitkernels.patch_embed(x, weight, bias, pos, prefix, no_embed_class, dynamic_img_pad)

else:
    embed_op.mark_missing("native", _native.IMPORT_ERROR)
