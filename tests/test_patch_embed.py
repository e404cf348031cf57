"""Patch embedding (ViT / DeiT): reference vs independent formulations and timm; validation; dispatch."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkernels
from vitkernels.ops import patch_embed as ops
from vitkernels.reference import patch_embed as reference

from helpers import assert_close, import_timm


# --- independent formulations -------------------------------------------------------------------------------------

def conv_tokens(x, weight, bias, dynamic_img_pad):
    """timm's PatchEmbed path: (pad) + stride-p Conv2d + flatten(2).transpose(1, 2)."""
    ph, pw = weight.shape[-2:]
    if dynamic_img_pad:
        x = F.pad(x, (0, (pw - x.shape[-1] % pw) % pw, 0, (ph - x.shape[-2] % ph) % ph))
    return F.conv2d(x, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)


def unfold_tokens(x, weight, bias, dynamic_img_pad):
    """F.unfold im2col (columns in (c, py, px) order) + einsum with the flattened weight."""
    ph, pw = weight.shape[-2:]
    if dynamic_img_pad:
        x = F.pad(x, (0, (pw - x.shape[-1] % pw) % pw, 0, (ph - x.shape[-2] % ph) % ph))
    cols = F.unfold(x, kernel_size=(ph, pw), stride=(ph, pw))  # (B, C*ph*pw, L)
    out = torch.einsum("bkl,dk->bld", cols, weight.reshape(weight.shape[0], -1))
    return out if bias is None else out + bias


def assemble(tokens, pos, prefix, no_embed_class):
    """timm ``_pos_embed`` written as explicit row writes into the output (no cat)."""
    B, L, D = tokens.shape
    P = 0 if prefix is None else prefix.shape[-2]
    out = tokens.new_empty(B, P + L, D)
    pos2 = None if pos is None else pos.reshape(-1, D)
    for i in range(P):
        row = prefix.reshape(P, D)[i]
        if pos2 is not None and not no_embed_class:
            row = row + pos2[i]
        out[:, i] = row
    body = tokens
    if pos2 is not None:
        body = body + (pos2 if no_embed_class else pos2[P:])
    out[:, P:] = body
    return out


def make_inputs(B, C, H, W, D, patch, P, no_embed_class, dynamic_img_pad, dtype=torch.float64, with_pos=True,
                with_bias=True, device="cpu"):
    ph, pw = patch
    gh, gw = reference.grid_size(H, W, patch, dynamic_img_pad)
    L = gh * gw
    x = torch.randn(B, C, H, W, dtype=dtype, device=device)
    weight = torch.randn(D, C, ph, pw, dtype=dtype, device=device) / (C * ph * pw) ** 0.5
    bias = torch.randn(D, dtype=dtype, device=device) if with_bias else None
    pos = torch.randn(1, L if no_embed_class else L + P, D, dtype=dtype, device=device) if with_pos else None
    prefix = torch.randn(1, P, D, dtype=dtype, device=device) if P else None
    return x, weight, bias, pos, prefix


# (B, C, H, W, D, patch, dynamic_img_pad)
SHAPES = [
    (2, 3, 32, 48, 24, (16, 16), False),
    (1, 3, 28, 42, 20, (14, 14), False),
    (2, 2, 64, 32, 8, (32, 32), False),
    (3, 4, 12, 18, 10, (4, 6), False),
    (2, 3, 37, 21, 12, (16, 16), True),
    (1, 3, 30, 45, 16, (14, 14), True),
    (2, 5, 8, 8, 6, (4, 4), True),  # already whole patches: the pad is a no-op
]


# --- reference vs independent formulations ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-p{s[5]}-pad{int(s[6])}")
def test_patchify_matches_unfold(shape):
    B, C, H, W, D, patch, dynamic = shape
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    if dynamic:
        x = reference.pad_to_patches(x, patch)
    expected = F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)
    torch.testing.assert_close(reference.patchify(x, patch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("P", [0, 1, 2, 5])
@pytest.mark.parametrize("no_embed_class", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-p{s[5]}-pad{int(s[6])}")
def test_reference_matches_conv_and_unfold(shape, P, no_embed_class):
    B, C, H, W, D, patch, dynamic = shape
    x, weight, bias, pos, prefix = make_inputs(B, C, H, W, D, patch, P, no_embed_class, dynamic)
    out = reference.patch_embed(x, weight, bias, pos, prefix, no_embed_class, dynamic)
    gh, gw = reference.grid_size(H, W, patch, dynamic)
    assert out.shape == (B, P + gh * gw, D)
    for tokens in (conv_tokens(x, weight, bias, dynamic), unfold_tokens(x, weight, bias, dynamic)):
        assert_close(out, assemble(tokens, pos, prefix, no_embed_class))
    # the public op (reference backend) with (P, D) / (N, D) shapes gives the same
    prefix2 = None if prefix is None else prefix[0]
    via_op = vitkernels.patch_embed(x, weight, bias, pos[0], prefix2, no_embed_class, dynamic, backend="reference")
    torch.testing.assert_close(via_op, out, rtol=0, atol=0)


@pytest.mark.parametrize("with_pos,with_bias,P", [(False, True, 1), (True, False, 0), (False, False, 0)])
def test_reference_optional_parts(with_pos, with_bias, P):
    x, weight, bias, pos, prefix = make_inputs(2, 3, 32, 16, 8, (16, 16), P, False, False,
                                               with_pos=with_pos, with_bias=with_bias)
    out = vitkernels.patch_embed(x, weight, bias, pos, prefix, backend="reference")
    assert_close(out, assemble(conv_tokens(x, weight, bias, False), pos, prefix, False))


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_pos_embed_step(no_embed_class):
    tokens = torch.randn(3, 6, 8, dtype=torch.float64)
    prefix = torch.randn(1, 2, 8, dtype=torch.float64)
    pos = torch.randn(1, 6 if no_embed_class else 8, 8, dtype=torch.float64)
    out = ops.pos_embed(tokens, pos, prefix, no_embed_class)
    assert_close(out, assemble(tokens, pos, prefix, no_embed_class))
    with pytest.raises(ValueError, match="pos_embed"):
        ops.pos_embed(tokens, pos[:, 1:], prefix, no_embed_class)


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_reference_gradients_match_conv(no_embed_class):
    B, C, H, W, D, patch, dynamic = 2, 3, 20, 27, 6, (8, 8), True
    P = 2
    inputs = make_inputs(B, C, H, W, D, patch, P, no_embed_class, dynamic)
    grad_out = None
    grads = []
    for formulation in ("reference", "conv"):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        x, weight, bias, pos, prefix = leaves
        if formulation == "reference":
            out = reference.patch_embed(x, weight, bias, pos, prefix, no_embed_class, dynamic)
        else:
            out = assemble(conv_tokens(x, weight, bias, dynamic), pos, prefix, no_embed_class)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        assert_close(ours, theirs)


def test_reference_gradcheck():
    inputs = make_inputs(1, 2, 6, 9, 3, (3, 3), 2, False, True)
    inputs = [t.requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(
        lambda *t: reference.patch_embed(*t, no_embed_class=False, dynamic_img_pad=True), inputs
    )


def test_resample_patch_embed_round_trip():
    """Upsampling a kernel and applying it to an upsampled image gives about the original embedding (FlexiViT)."""
    w = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    w16 = reference.resample_patch_embed(w, (16, 16))
    assert w16.shape == (4, 3, 16, 16)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    x16 = F.interpolate(x.float(), size=(16, 16), mode="bicubic", antialias=True).double()
    torch.testing.assert_close(F.conv2d(x16, w16, stride=16), F.conv2d(x, w, stride=8), rtol=1e-3, atol=1e-3)


# --- reference modules vs timm ------------------------------------------------------------------------------------

PATCH_EMBED_CONFIGS = [
    dict(flatten=flatten, output_fmt=fmt, strict_img_size=strict, dynamic_img_pad=dyn)
    for flatten, fmt, strict, dyn in itertools.product(
        (True, False), (None, "NCHW", "NHWC", "NLC", "NCL"), (True, False), (False, True)
    )
    if not (fmt is not None and not flatten)  # output_fmt overrides flatten: one of each pair suffices
]


def _cfg_id(cfg):
    return f"flat{int(cfg['flatten'])}-{cfg['output_fmt']}-strict{int(cfg['strict_img_size'])}-pad{int(cfg['dynamic_img_pad'])}"


@pytest.mark.timm
@pytest.mark.parametrize("cfg", PATCH_EMBED_CONFIGS, ids=_cfg_id)
def test_patch_embed_module_matches_timm(cfg):
    timm = import_timm()
    kw = dict(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=12, **cfg)
    theirs = timm.layers.PatchEmbed(**kw)
    ours = reference.PatchEmbed(**kw)
    for name in ("img_size", "grid_size", "num_patches", "patch_size", "flatten", "strict_img_size",
                 "dynamic_img_pad"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.output_fmt.value == theirs.output_fmt.value
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())  # timm -> ours
    sizes = [(32, 48)]
    if not cfg["strict_img_size"]:
        sizes.append((48, 16))
        if cfg["dynamic_img_pad"]:
            sizes.append((37, 50))
    for H, W in sizes:
        x = torch.randn(2, 3, H, W)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        assert ours.dynamic_feat_size((H, W)) == theirs.dynamic_feat_size((H, W))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p))
    theirs.load_state_dict(ours.state_dict())  # ours -> timm
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    # bad sizes are refused by both (timm asserts, we raise ValueError naming x)
    bad = (33, 48) if cfg["strict_img_size"] or not cfg["dynamic_img_pad"] else None
    if bad is not None:
        xb = torch.randn(1, 3, *bad)
        with pytest.raises(AssertionError):
            theirs(xb)
        with pytest.raises(ValueError, match="x"):
            ours(xb)


@pytest.mark.timm
def test_patch_embed_module_extras_match_timm():
    timm = import_timm()
    kw = dict(img_size=32, patch_size=8, in_chans=2, embed_dim=6, norm_layer=nn.LayerNorm, bias=False)
    theirs, ours = timm.layers.PatchEmbed(**kw), reference.PatchEmbed(**kw)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 2, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert ours.feat_ratio() == theirs.feat_ratio() and ours.feat_ratio(False) == theirs.feat_ratio(False)
    for args in (dict(img_size=(40, 24)), dict(patch_size=4), dict(img_size=48, patch_size=(12, 6))):
        theirs.set_input_size(**args)
        ours.set_input_size(**args)
        assert (ours.img_size, ours.grid_size, ours.num_patches, ours.patch_size) == (
            theirs.img_size, theirs.grid_size, theirs.num_patches, theirs.patch_size)
        torch.testing.assert_close(ours.proj.weight, theirs.proj.weight, rtol=1e-5, atol=1e-6)
        xs = torch.randn(1, 2, *ours.img_size)
        torch.testing.assert_close(ours(xs), theirs(xs), rtol=1e-5, atol=1e-5)
    # img_size=None: no checks, the convolution drops incomplete patches, as timm
    theirs, ours = timm.layers.PatchEmbed(img_size=None, patch_size=8, embed_dim=4), reference.PatchEmbed(
        img_size=None, patch_size=8, embed_dim=4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 20, 27)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def _timm_embed(model, x):
    return model._pos_embed(model.patch_embed(x))


TIMM_VITS = {
    # name: (factory name or None for VisionTransformer, kwargs, image size)
    "vit_tiny": ("vit_tiny_patch16_224", dict(img_size=(48, 64)), (48, 64)),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=(64, 32)), (64, 32)),
    "reg4_no_embed_class": (None, dict(img_size=(32, 48), patch_size=14, no_embed_class=True, reg_tokens=4), (32, 48)),
    "reg2_embed_class": (None, dict(img_size=32, patch_size=16, reg_tokens=2), (32, 32)),
    "no_cls_avg_no_embed_class": (None, dict(img_size=32, class_token=False, global_pool="avg",
                                             no_embed_class=True), (32, 32)),
    "no_pos_embed": (None, dict(img_size=32, pos_embed="none"), (32, 32)),
    "pre_norm_embed_norm": (None, dict(img_size=32, pre_norm=True, embed_norm_layer="layernorm"), (32, 32)),
    "dynamic_img_size_pad": (None, dict(img_size=32, dynamic_img_size=True, dynamic_img_pad=True,
                                        no_embed_class=True), (40, 50)),
    "dynamic_img_size": (None, dict(img_size=32, dynamic_img_size=True, reg_tokens=1), (48, 64)),
}


def build_timm_vit(name):
    timm = import_timm()
    factory, kwargs, size = TIMM_VITS[name]
    common = dict(depth=1, num_heads=2, num_classes=0)
    if factory is None:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(embed_dim=16, **common, **kwargs)
    else:
        model = timm.create_model(factory, pretrained=False, **common, **kwargs)
    with torch.no_grad():  # cls / reg tokens are initialised ~1e-6: make every part visible in the output
        for key in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            if getattr(model, key, None) is not None:
                getattr(model, key).normal_()
    return model.eval(), size


@pytest.mark.timm
@pytest.mark.parametrize("name", list(TIMM_VITS))
def test_vit_embedding_matches_timm(name):
    model, (H, W) = build_timm_vit(name)
    x = torch.randn(2, 3, H, W)
    expected = _timm_embed(model, x)
    ours = reference.ViTEmbedding.from_timm(model).eval()
    assert ours.num_prefix_tokens == model.num_prefix_tokens
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    # the functional op with timm's parameters gives the same (no embedding norm, no resampling there)
    if isinstance(model.patch_embed.norm, nn.Identity) and not model.dynamic_img_size:
        # (timm's stride-p conv drops incomplete patches: 32x48 at patch 14 uses 28x42; the op wants whole patches)
        gh, gw = model.patch_embed.dynamic_feat_size((H, W))
        ph, pw = model.patch_embed.patch_size
        xc = x if model.patch_embed.dynamic_img_pad else x[:, :, : gh * ph, : gw * pw]
        out = vitkernels.patch_embed(
            xc, model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.pos_embed, ours.prefix_tokens(),
            model.no_embed_class, model.patch_embed.dynamic_img_pad, backend="reference",
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # ours -> timm: loads with strict=False, missing only the non-embedding keys, nothing unexpected
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.5 * torch.randn_like(p))
    result = model.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k in ours.state_dict()]
    torch.testing.assert_close(ours(x), _timm_embed(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.timm
def test_vit_embedding_set_input_size_matches_timm():
    model, _ = build_timm_vit("vit_tiny")
    ours = reference.ViTEmbedding.from_timm(model)
    model.set_input_size(img_size=(64, 80))
    ours.set_input_size(img_size=(64, 80))
    assert ours.pos_embed.shape == model.pos_embed.shape
    torch.testing.assert_close(ours.pos_embed, model.pos_embed, rtol=1e-6, atol=1e-6)
    x = torch.randn(1, 3, 64, 80)
    torch.testing.assert_close(ours(x), _timm_embed(model, x), rtol=1e-5, atol=1e-5)


def test_vit_embedding_state_dict_keys():
    embed = reference.ViTEmbedding(img_size=32, patch_size=16, embed_dim=8, distilled=True)
    assert set(embed.state_dict()) == {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token",
                                       "dist_token", "pos_embed"}
    assert embed.pos_embed.shape == (1, 4 + 2, 8)
    full = {"blocks.0.norm1.weight": torch.ones(8), "head.weight": torch.ones(2, 8),
            **{f"model.{k}": v for k, v in embed.state_dict().items()}}
    picked = reference.vit_embedding_state_dict(full, prefix="model.")
    assert picked.keys() == embed.state_dict().keys()
    with pytest.raises(ValueError, match="distilled"):
        reference.ViTEmbedding(distilled=True, reg_tokens=2)


# --- bad inputs ---------------------------------------------------------------------------------------------------

def _good(**over):
    args = dict(
        x=torch.randn(2, 3, 32, 48), weight=torch.randn(8, 3, 16, 16), bias=torch.randn(8),
        pos_embed=torch.randn(1, 6 + 2, 8), prefix_tokens=torch.randn(1, 2, 8), no_embed_class=False,
        dynamic_img_pad=False,
    )
    args.update(over)
    return args


BAD_INPUTS = [
    (dict(x=torch.randn(3, 32, 48)), ValueError, "x must have 4 dimensions"),
    (dict(x=torch.randn(2, 3, 32, 48).to(torch.int32)), TypeError, "x must have dtype"),
    (dict(x="image"), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(8, 3, 16)), ValueError, "weight must have 4 dimensions"),
    (dict(weight=torch.randn(8, 4, 16, 16)), ValueError, "weight must have shape"),
    (dict(weight=torch.randn(8, 3, 16, 16, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(bias=torch.randn(7)), ValueError, "bias must have shape"),
    (dict(bias=torch.randn(8, 1)), ValueError, "bias must have 1 dimensions"),
    (dict(x=torch.randn(2, 3, 33, 48)), ValueError, "x: image size"),
    (dict(x=torch.randn(2, 3, 32, 40)), ValueError, "x: image size"),
    (dict(pos_embed=torch.randn(1, 6, 8)), ValueError, "pos_embed must have N = 8"),
    (dict(pos_embed=torch.randn(1, 8, 8), no_embed_class=True), ValueError, "pos_embed must have N = 6"),
    (dict(pos_embed=torch.randn(2, 8, 8)), ValueError, "pos_embed must have shape"),
    (dict(pos_embed=torch.randn(1, 8, 7)), ValueError, "pos_embed must have D = 8"),
    (dict(pos_embed=torch.randn(8)), ValueError, "pos_embed must have 2 or 3 dimensions"),
    (dict(prefix_tokens=torch.randn(1, 2, 7)), ValueError, "prefix_tokens must have D = 8"),
    (dict(prefix_tokens=torch.randn(2, 2, 8)), ValueError, "prefix_tokens must have shape"),
    (dict(prefix_tokens=torch.randn(1, 2, 8).half()), TypeError, "prefix_tokens has dtype"),
    (dict(prefix_tokens=torch.randn(1, 3, 8)), ValueError, "pos_embed must have N = 9"),
    (dict(no_embed_class=1), TypeError, "no_embed_class must be a bool"),
    (dict(dynamic_img_pad="yes"), TypeError, "dynamic_img_pad must be a bool"),
    (dict(x=torch.randn(2, 3, 0, 48)), ValueError, "x must have non-empty"),
]


@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        vitkernels.patch_embed(**_good(**over))


def test_bad_device_mix():
    if not torch.cuda.is_available():
        pos = torch.randn(1, 8, 8, device="meta")
        with pytest.raises(ValueError, match="pos_embed is on meta"):
            vitkernels.patch_embed(**_good(pos_embed=pos))
    else:
        with pytest.raises(ValueError, match="weight is on"):
            vitkernels.patch_embed(**_good(weight=torch.randn(8, 3, 16, 16, device="cuda")))


def test_dynamic_img_pad_accepts_any_size():
    args = _good(x=torch.randn(2, 3, 33, 40), pos_embed=torch.randn(1, 9 + 2, 8), dynamic_img_pad=True)
    assert vitkernels.patch_embed(**args).shape == (2, 11, 8)


def test_backend_names():
    args = _good()
    with pytest.raises(vitkernels.BackendUnavailableError, match="native"):
        vitkernels.patch_embed(**args, backend="native")
    with pytest.raises(ValueError, match="backend"):
        vitkernels.patch_embed(**args, backend="cuda")
