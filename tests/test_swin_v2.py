"""Swin V2 modules (reference and fast) against timm's swin_transformer_v2: constructor, state dict, buffers, outputs
and every gradient (logit_scale and the cpb MLP included), in float64 and float32; patched timm models."""
import copy
import math

import pytest
import torch

import vitkernels
from vitkernels.reference import swin_v2 as reference

from helpers import import_timm

pytestmark = pytest.mark.timm

BLOCK_CASES = [  # (input_resolution, window, shift, always_partition, pretrained_window_size)
    ((16, 16), 8, 4, False, 0),
    ((9, 10), 7, 3, False, 0),       # padding (q/v-bias tokens), shifted
    ((14, 7), 7, 3, False, 0),       # W <= window: shift clamped to 0 on that axis only
    ((5, 6), 7, 3, False, 0),        # window clamped to the resolution, no shift
    ((9, 10), 7, 3, True, 0),        # always_partition keeps the window and shift, pads
    ((10, 13), (3, 4), (1, 2), False, 0),  # non-square window
    ((12, 12), 6, 3, False, 4),      # pretrained_window_size: coordinates normalised by the pretraining window
]
CASE_IDS = [f"{c[0]}w{c[1]}s{c[2]}{'A' if c[3] else ''}p{c[4]}" for c in BLOCK_CASES]
IMPLS = {"reference": reference.SwinTransformerV2Block, "fast": vitkernels.SwinV2Block}


def timm_v2():
    import_timm()
    from timm.models import swin_transformer_v2

    return swin_transformer_v2


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (timm's init zeroes the post-norms, q/v biases and cpb output scale, which
    would hide most of the attention's arithmetic), some logit scales above the clamp at log(100)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("logit_scale"):
                # uniform in [0, 6]: the heads above log(100) = 4.6 are clamped (zero gradient)
                r = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 6.0
                r.view(-1)[0] = math.log(10)
                r.view(-1)[-1] = 5.5
            elif ".norm" in name or name.startswith("norm"):
                r = 1.0 + 0.2 * r if name.endswith("weight") else 0.1 * r
            elif "cpb_mlp" in name:
                r = 0.5 * r
            else:
                r = 0.2 * r
            p.copy_(r.to(p.dtype))
    return module


def compare_outputs_and_grads(ours, theirs, x, rtol, atol):
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=rtol, atol=atol)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=rtol, atol=atol)
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    names = []
    for name, p in theirs.named_parameters():
        if p.grad is None:
            assert ours_grads[name] is None or not ours_grads[name].any(), name
            continue
        scale = max(1.0, p.grad.abs().max().item())
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=rtol, atol=atol * scale, msg=name)
        names.append(name)
    return names


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", BLOCK_CASES, ids=CASE_IDS)
def test_block_matches_timm_float64(impl, case):
    res, window, shift, always, pretrained = case
    kwargs = dict(dim=24, input_resolution=res, num_heads=3, window_size=window, shift_size=shift,
                  always_partition=always, pretrained_window_size=pretrained)
    theirs = randomize(timm_v2().SwinTransformerV2Block(**kwargs).double())
    ours = IMPLS[impl](**kwargs).double()
    assert ours.window_size == theirs.window_size and ours.shift_size == theirs.shift_size
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for key in ("attn.relative_position_index", "attn.relative_coords_table", "attn.k_bias", "attn_mask"):
        assert key not in ours.state_dict()
    ours.load_state_dict(theirs.state_dict())
    for name in ("relative_position_index", "relative_coords_table", "k_bias"):
        assert torch.equal(getattr(ours.attn, name), getattr(theirs.attn, name)), name
    if theirs.attn_mask is None:
        assert ours.attn_mask is None
    else:
        assert torch.equal(ours.attn_mask, theirs.attn_mask)
    x = torch.randn(2, *res, 24, dtype=torch.float64)
    names = compare_outputs_and_grads(ours, theirs, x, rtol=1e-9, atol=1e-9)
    for required in ("attn.logit_scale", "attn.cpb_mlp.0.weight", "attn.cpb_mlp.0.bias", "attn.cpb_mlp.2.weight",
                     "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "norm1.weight"):
        assert required in names
    # the clamped head (logit_scale 5.5 > log 100) gets no gradient, the others do
    g = dict(ours.named_parameters())["attn.logit_scale"].grad.view(-1)
    assert g[-1] == 0 and g[0] != 0


@pytest.mark.parametrize("impl", list(IMPLS))
def test_block_matches_timm_float32(impl):
    kwargs = dict(dim=32, input_resolution=(9, 10), num_heads=2, window_size=7, shift_size=3)
    theirs = randomize(timm_v2().SwinTransformerV2Block(**kwargs))
    ours = IMPLS[impl](**kwargs)
    ours.load_state_dict(theirs.state_dict())
    compare_outputs_and_grads(ours, theirs, torch.randn(2, 9, 10, 32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("qkv_bias,separate", [(True, False), (True, True), (False, False)],
                         ids=["qv-bias", "qkv-bias-separate", "no-bias"])
def test_window_attention_module_matches_timm(impl, qkv_bias, separate):
    cls = reference.WindowAttentionV2 if impl == "reference" else vitkernels.WindowAttentionV2
    kwargs = dict(window_size=(3, 4), num_heads=3, qkv_bias=qkv_bias, qkv_bias_separate=separate,
                  pretrained_window_size=(2, 3))
    theirs = randomize(timm_v2().WindowAttention(24, **kwargs).double())
    ours = cls(24, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.relative_coords_table, theirs.relative_coords_table)
    x = torch.randn(6, 12, 24, dtype=torch.float64)
    compare_outputs_and_grads(ours, theirs, x, rtol=1e-10, atol=1e-10)
    mask = torch.where(torch.rand(3, 12, 12) > 0.5, 0.0, -100.0).double()
    torch.testing.assert_close(ours(x, mask), theirs(x, mask), rtol=1e-10, atol=1e-10)


def test_patch_merging_matches_timm():
    theirs = randomize(timm_v2().PatchMerging(8, out_dim=12).double())
    ours = reference.PatchMergingV2(8, out_dim=12).double()
    ours.load_state_dict(theirs.state_dict())
    for shape in [(2, 6, 8, 8), (1, 7, 5, 8)]:  # odd sizes are padded
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_stage_matches_timm(impl):
    cls = reference.SwinTransformerV2Stage if impl == "reference" else vitkernels.SwinTransformerV2Stage
    kwargs = dict(dim=16, out_dim=32, input_resolution=(18, 20), depth=2, downsample=True, num_heads=2,
                  window_size=7, drop_path=[0.0, 0.1], pretrained_window_size=5)
    theirs = randomize(timm_v2().SwinTransformerV2Stage(**kwargs).double()).eval()
    ours = cls(**kwargs).double().eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 18, 20, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    for new_size, window in [((12, 14), 4), ((18, 20), (5, 6))]:
        ours.set_input_size(new_size, window)
        theirs.set_input_size(new_size, window)
        x = torch.randn(1, *new_size, 16, dtype=torch.float64)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_stage_post_norm_init_matches_timm():
    kwargs = dict(dim=8, out_dim=8, input_resolution=(8, 8), depth=2, num_heads=2, window_size=4)
    stage = reference.SwinTransformerV2Stage(**kwargs)
    stage._init_respostnorm()
    assert all(not b.norm1.weight.any() and not b.norm2.bias.any() for b in stage.blocks)
