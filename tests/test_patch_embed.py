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
    with pytest.raises(ValueError, match="backend"):
        vitkernels.patch_embed(**args, backend="cuda")


# === Triton kernels (CPU interpreter on tiny shapes; CUDA when present) ==========================================

from helpers import reference_dtype, tol, triton_interpreter_or_cuda  # noqa: E402


def assert_close_scaled(actual, expected, dtype):
    """Per-dtype tolerance, absolute part scaled by the magnitude of the expected values (sums over many terms)."""
    t = tol(dtype)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=t["atol"] * scale, rtol=t["rtol"])


def run_fwd_bwd(inputs, no_embed_class, dynamic_img_pad, backend, grad_out=None):
    """Forward + backward of the public op; returns (out, grads of the given leaves (None stays None), grad_out)."""
    x, weight, bias, pos, prefix = inputs
    out = vitkernels.patch_embed(x, weight, bias, pos, prefix, no_embed_class, dynamic_img_pad, backend=backend)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad_out)
    it = iter(grads)
    return out, [next(it) if (t is not None and t.requires_grad) else None for t in inputs], grad_out


def check_triton_against_reference(shape, P, no_embed_class, dtype, device="cpu", with_bias=True, with_pos=True,
                                   x_transform=None, backend="triton"):
    B, C, H, W, D, patch, dynamic = shape
    inputs = make_inputs(B, C, H, W, D, patch, P, no_embed_class, dynamic, dtype=dtype, device=device,
                         with_bias=with_bias, with_pos=with_pos)
    if x_transform is not None:
        inputs = (x_transform(inputs[0]),) + tuple(inputs[1:])
    leaves = tuple(None if t is None else t.detach().requires_grad_(True) for t in inputs)
    out, grads, grad_out = run_fwd_bwd(leaves, no_embed_class, dynamic, backend)
    rdt = reference_dtype(dtype)
    ref_leaves = tuple(None if t is None else t.detach().to(rdt).requires_grad_(True) for t in inputs)
    ref_out, ref_grads, _ = run_fwd_bwd(ref_leaves, no_embed_class, dynamic, "reference", grad_out.to(rdt))
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close_scaled(out, ref_out, dtype)
    names = ("x", "weight", "bias", "pos_embed", "prefix_tokens")
    for name, g, rg, t in zip(names, grads, ref_grads, inputs):
        if t is None:
            continue
        assert g is not None and g.shape == t.shape and g.dtype == dtype, name
        assert_close_scaled(g, rg, dtype)


# (B, C, H, W, D, patch, dynamic_img_pad): patch 14 / 16 / 32, non-square images, padding, odd sizes
TRITON_SHAPES = [
    (2, 3, 32, 48, 24, (16, 16), False),
    (1, 3, 28, 42, 20, (14, 14), False),
    (2, 2, 64, 32, 16, (32, 32), False),
    (2, 3, 37, 21, 12, (16, 16), True),
    (1, 3, 30, 45, 16, (14, 14), True),
    # rectangular patches; M = 75 rows over 3 row tiles (the weight gradient's split-M reduction), D = 72 over
    # 2 column tiles, images straddling tiles
    (3, 2, 20, 30, 72, (4, 6), True),
]
_SHAPE_IDS = ["x".join(map(str, s[:4])) + f"-D{s[4]}-p{s[5][0]}x{s[5][1]}-pad{int(s[6])}" for s in TRITON_SHAPES]


@pytest.mark.parametrize("P,no_embed_class", [(0, False), (1, False), (2, False), (5, True), (2, True), (0, True)],
                         ids=["P0", "vit-cls", "deit-cls-dist", "cls-reg4-noembedcls", "deit-noembedcls",
                              "P0-noembedcls"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=_SHAPE_IDS)
def test_triton_fp32_forward_backward(shape, P, no_embed_class):
    triton_interpreter_or_cuda("cpu")
    check_triton_against_reference(shape, P, no_embed_class, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape,P,no_embed_class", [
    (TRITON_SHAPES[0], 1, False), (TRITON_SHAPES[1], 5, True), (TRITON_SHAPES[2], 2, False),
    (TRITON_SHAPES[3], 0, False),
], ids=["p16-vit", "p14-reg-noembedcls", "p32-deit", "pad-P0"])
def test_triton_half_forward_backward(shape, P, no_embed_class, dtype):
    triton_interpreter_or_cuda("cpu")
    check_triton_against_reference(shape, P, no_embed_class, dtype)


@pytest.mark.parametrize("with_bias,with_pos", [(False, True), (True, False), (False, False)])
def test_triton_optional_bias_pos(with_bias, with_pos):
    triton_interpreter_or_cuda("cpu")
    check_triton_against_reference(TRITON_SHAPES[3], 1, False, torch.float32, with_bias=with_bias, with_pos=with_pos)


@pytest.mark.parametrize("layout", ["channels_last", "cropped_view"])
def test_triton_strided_image(layout):
    """The gather reads the image through its strides: no copy for channels_last or a cropped view."""
    triton_interpreter_or_cuda("cpu")
    if layout == "channels_last":
        transform = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    else:
        transform = lambda x: torch.nn.functional.pad(x, (1, 3, 2, 0))[:, :, 2:, 1:-3]  # noqa: E731
    check_triton_against_reference(TRITON_SHAPES[0], 2, False, torch.float32, x_transform=transform)


def test_triton_partial_gradients(monkeypatch):
    """Only some inputs require grad: the others get none and the kernels for them are skipped."""
    triton_interpreter_or_cuda("cpu")
    from vitkernels.triton import patch_embed as kernels

    calls = []
    real_bwd = kernels.patch_embed_bwd
    monkeypatch.setattr(kernels, "patch_embed_bwd", lambda *a: calls.append(a[-2:]) or real_bwd(*a))
    x, weight, bias, pos, prefix = make_inputs(2, 3, 32, 16, 8, (16, 16), 1, False, False, dtype=torch.float32)
    weight.requires_grad_(True)
    pos.requires_grad_(True)
    out = vitkernels.patch_embed(x, weight, bias, pos, prefix, backend="triton")
    g = torch.randn_like(out)
    gw, gp = torch.autograd.grad(out, (weight, pos), g)
    assert calls == [(False, True)]  # (need_input, need_weight): no image-gradient kernel
    wd, pd = weight.detach().double().requires_grad_(), pos.detach().double().requires_grad_()
    ref = vitkernels.patch_embed(x.double(), wd, bias.double(), pd, prefix.double(), backend="reference")
    rgw, rgp = torch.autograd.grad(ref, (wd, pd), g.double())
    assert_close(gw, rgw, torch.float32)
    assert_close(gp, rgp, torch.float32)


def test_triton_opcheck():
    triton_interpreter_or_cuda("cpu")
    x, weight, bias, pos, prefix = make_inputs(2, 3, 20, 12, 8, (8, 8), 2, False, True, dtype=torch.float32)
    args = [t.requires_grad_(True) for t in (x, weight, bias, pos[0], prefix[0])]
    torch.library.opcheck(torch.ops.vitkernels.triton_patch_embed.default, (*args, False, True))
    # no prefix / no pos / no bias, no_embed_class order
    torch.library.opcheck(torch.ops.vitkernels.triton_patch_embed.default, (x, weight, None, None, None, True, True))
    grad = torch.randn(2, 2 + 6, 8)
    torch.library.opcheck(torch.ops.vitkernels.triton_patch_embed_backward.default,
                          (grad, x.detach(), weight.detach(), 2, True, True, True))


def test_triton_compile_fullgraph():
    triton_interpreter_or_cuda("cpu")
    inputs = make_inputs(2, 3, 24, 40, 8, (8, 8), 2, True, True, dtype=torch.float32)
    inputs = tuple(t.requires_grad_(True) for t in inputs)

    def f(x, w, b, pos, prefix):
        return vitkernels.patch_embed(x, w, b, pos, prefix, True, True, backend="triton") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    expected = f(*inputs)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(got, want)


def test_triton_backend_refuses_float64():
    triton_interpreter_or_cuda("cpu")
    with pytest.raises(vitkernels.BackendUnavailableError, match="float64"):
        vitkernels.patch_embed(**{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in _good().items()},
                               backend="triton")


# --- fast modules ---------------------------------------------------------------------------------------------------

@pytest.fixture(params=["reference", "triton", "native"])
def module_backend(request, monkeypatch):
    """Run the fast modules' op on this backend (through VITKERNELS_BACKEND, as a user would)."""
    if request.param == "triton":
        triton_interpreter_or_cuda("cpu")
    if request.param == "native":
        native_or_skip()
    monkeypatch.setenv("VITKERNELS_BACKEND", request.param)
    return request.param


@pytest.mark.timm
@pytest.mark.parametrize("cfg", [c for c in PATCH_EMBED_CONFIGS if not c["strict_img_size"]], ids=_cfg_id)
def test_fast_patch_embed_matches_timm(cfg, module_backend):
    timm = import_timm()
    kw = dict(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=12, **cfg)
    theirs = timm.layers.PatchEmbed(**kw)
    ours = vitkernels.PatchEmbed(**kw)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    sizes = [(32, 48), (48, 16)] + ([(37, 50)] if cfg["dynamic_img_pad"] else [])
    for H, W in sizes:
        x = torch.randn(2, 3, H, W, requires_grad=True)
        out, expected = ours(x), theirs(x)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-5)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, ours.proj.weight, ours.proj.bias), g)
        want = torch.autograd.grad(expected, (x, theirs.proj.weight, theirs.proj.bias), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=5e-5)


@pytest.mark.timm
@pytest.mark.parametrize("name", list(TIMM_VITS))
def test_fast_vit_embedding_matches_timm(name, module_backend):
    model, (H, W) = build_timm_vit(name)
    ours = vitkernels.ViTEmbedding.from_timm(model)
    assert type(ours.patch_embed) is vitkernels.PatchEmbed
    x = torch.randn(2, 3, H, W)
    torch.testing.assert_close(ours(x), _timm_embed(model, x), rtol=2e-4, atol=2e-5)


@pytest.mark.timm
@pytest.mark.parametrize("name", ["vit_tiny", "deit_tiny_distilled", "reg4_no_embed_class", "no_pos_embed",
                                  "pre_norm_embed_norm", "dynamic_img_size_pad"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "proj-only"])
def test_patched_timm_model_gives_identical_features(name, fuse, module_backend):
    """A timm ViT / DeiT whose embedding is swapped for ours: same state dict, same features, same gradients."""
    import copy

    from vitkernels.compat.timm import patch_vit_embedding

    model, (H, W) = build_timm_vit(name)
    swapped = patch_vit_embedding(copy.deepcopy(model), fuse_pos_embed=fuse)
    assert isinstance(swapped.patch_embed, vitkernels.PatchEmbed)
    assert swapped.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, H, W)
    out, expected = swapped.forward_features(x), model.forward_features(x)
    torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-4)
    out.square().sum().backward()
    expected.square().sum().backward()
    theirs = dict(model.named_parameters())
    for key, p in swapped.named_parameters():
        if key.startswith("patch_embed") or key in reference.EMBEDDING_KEYS:
            torch.testing.assert_close(p.grad, theirs[key].grad, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.timm
def test_patched_timm_model_compiles_fullgraph(module_backend):
    from vitkernels.compat.timm import patch_vit_embedding

    model, (H, W) = build_timm_vit("deit_tiny_distilled")
    patch_vit_embedding(model)
    x = torch.randn(2, 3, H, W)
    compiled = torch.compile(model.patch_embed, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model.patch_embed(x))


# --- CUDA (issue-sized shapes) -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,P,no_embed_class", [
    ((8, 3, 224, 224, 768, (16, 16), False), 1, False),     # ViT-B/16
    ((4, 3, 224, 224, 384, (14, 14), False), 5, True),      # ViT-S/14 + 4 registers (DINOv2 order)
    ((4, 3, 384, 384, 768, (32, 32), False), 2, False),     # DeiT-style B/32 at 384
    ((3, 3, 250, 181, 192, (16, 16), True), 2, False),      # non-square, dynamic pad
], ids=["vitb16", "vits14-reg4", "b32-384-deit", "pad-250x181"])
def test_triton_cuda(shape, P, no_embed_class, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 checked at fp32 accuracy
    check_triton_against_reference(shape, P, no_embed_class, dtype, device="cuda")


@pytest.mark.cuda
def test_triton_cuda_opcheck_and_inductor():
    inputs = make_inputs(4, 3, 64, 48, 96, (16, 16), 2, False, False, dtype=torch.bfloat16, device="cuda")
    args = [t.requires_grad_(True) for t in (inputs[0], inputs[1], inputs[2], inputs[3][0], inputs[4][0])]
    torch.library.opcheck(torch.ops.vitkernels.triton_patch_embed.default, (*args, False, False))

    def f(x, w, b, pos, prefix):
        return vitkernels.patch_embed(x, w, b, pos, prefix, backend="triton").float().square().mean()

    compiled = torch.compile(f, fullgraph=True)
    loss, want = compiled(*args), f(*args)
    torch.testing.assert_close(loss, want, rtol=1e-2, atol=1e-2)
    for got, exp in zip(torch.autograd.grad(loss, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(got, exp, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.timm
def test_patched_timm_vit_cuda():
    import copy

    from vitkernels.compat.timm import patch_vit_embedding

    timm = import_timm()
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2).cuda().eval()
    swapped = patch_vit_embedding(copy.deepcopy(model))
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.backends.cudnn.flags(allow_tf32=False):
        torch.testing.assert_close(swapped.forward_features(x), model.forward_features(x), rtol=1e-4, atol=1e-4)


@pytest.mark.timm
def test_fast_vit_embedding_under_autocast(module_backend):
    """Under autocast the op runs in the autocast dtype, like timm's convolution, and returns the tokens in the dtype
    timm's cat / add promote them to (fp32, the parameters' dtype): a patched model's residual stream stays fp32."""
    model, (H, W) = build_timm_vit("deit_tiny_distilled")
    ours = vitkernels.ViTEmbedding.from_timm(model)
    x = torch.randn(2, 3, H, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = ours(x), _timm_embed(model, x)
    assert expected.dtype == torch.float32 and out.dtype == expected.dtype
    assert_close_scaled(out.float(), expected.float(), torch.bfloat16)


# === native backend (csrc/cpu/patch_embed.cpp) ====================================================================

def native_or_skip(device="cpu"):
    reason = vitkernels._native.native_unavailable_reason("patch_embed", torch.device(device))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("P,no_embed_class", [(0, False), (1, False), (2, False), (5, True)],
                         ids=["P0", "vit-cls", "deit-cls-dist", "cls-reg4-noembedcls"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=_SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_forward_backward(shape, P, no_embed_class, dtype):
    native_or_skip()
    check_triton_against_reference(shape, P, no_embed_class, dtype, backend="native")


@pytest.mark.parametrize("with_bias,with_pos", [(False, True), (True, False), (False, False)])
def test_native_optional_bias_pos(with_bias, with_pos):
    native_or_skip()
    check_triton_against_reference(TRITON_SHAPES[0], 1, False, torch.float32, with_bias=with_bias, with_pos=with_pos,
                                   backend="native")


def test_native_strided_image():
    native_or_skip()
    check_triton_against_reference(TRITON_SHAPES[3], 2, False, torch.float32, backend="native",
                                   x_transform=lambda x: x.to(memory_format=torch.channels_last))


@pytest.mark.parametrize("no_embed_class,dynamic", [(False, False), (True, True)])
def test_native_gradcheck_float64(no_embed_class, dynamic):
    native_or_skip()
    inputs = make_inputs(2, 2, 9 if dynamic else 8, 7 if dynamic else 12, 5, (4, 4), 2, no_embed_class, dynamic,
                         dtype=torch.float64)
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(
        lambda *a: vitkernels.patch_embed(*a, no_embed_class, dynamic, backend="native"), leaves
    )


def test_native_opcheck_and_compile():
    native_or_skip()
    x, w, b, pos, prefix = make_inputs(2, 3, 32, 48, 24, (16, 16), 1, False, False, dtype=torch.float32)
    args = (x.requires_grad_(), w.requires_grad_(), b, pos[0], prefix[0], False, False)
    torch.library.opcheck(torch.ops.vitkernels.patch_embed.default, args)

    def f(x, w, b, pos, prefix):
        return vitkernels.patch_embed(x, w, b, pos, prefix, backend="native") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, pos, prefix), f(x, w, b, pos, prefix))
