"""Swin V2 modules (reference and fast) against timm's swin_transformer_v2: constructor, state dict, buffers, outputs
and every gradient (logit_scale and the cpb MLP included), in float64 and float32; patched timm models."""
import copy
import math

import pytest
import torch

import vitkernels
from vitkernels.modules.swin import _drop_path_factors
from vitkernels.reference import swin_v2 as reference

from helpers import (
    OpCalls,
    build_timm_swinv2_or_skip,
    import_timm,
    linears_on_own_gemm,
    needs_padded_shift,
    skip_unless_timm_swinv2_pads,
    vitkernels_op_or_skip,
)

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
            r = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("logit_scale"):
                # uniform in [0, 6]: the heads above log(100) = 4.6 are clamped (zero gradient)
                r = torch.rand(p.shape, generator=gen, dtype=p.dtype) * 6.0
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
    x_scale = max(1.0, x_theirs.grad.abs().max().item())  # logit scales up to 100 make large input gradients
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=rtol, atol=atol * x_scale)
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
    ours = IMPLS[impl](**kwargs).double()
    skip_unless_timm_swinv2_pads(needs_padded_shift(res, ours.window_size, ours.shift_size))
    theirs = randomize(timm_v2().SwinTransformerV2Block(**kwargs).double())
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
    skip_unless_timm_swinv2_pads(needs_padded_shift((9, 10), (7, 7), (3, 3)))
    theirs = randomize(timm_v2().SwinTransformerV2Block(**kwargs))
    ours = IMPLS[impl](**kwargs)
    ours.load_state_dict(theirs.state_dict())
    compare_outputs_and_grads(ours, theirs, torch.randn(2, 9, 10, 32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eager_mlp", [False, True], ids=["bias-gelu", "gelu-mlp-eager"])
def test_block_fused_cpu_path_matches_timm_and_runs_the_native_ops(eager_mlp, monkeypatch):
    """float32 on CPU: the fast block runs its Linears as the CPU GEMM, fc1's bias + GELU as the native bias_gelu (or,
    where the Linears run vitkernels' own GEMM, the MLP as gelu_mlp_eager, the GELU in the GEMM's epilogues: both
    forced here) and each post-norm seam x + norm(linear(h)) as the native bias_layernorm_residual (in place in
    inference, with their native backwards in training), timm's GELU module (``act_layer="gelu"``, V2's default)
    included; outputs and gradients as timm's."""
    if not vitkernels._native.has_kernel("bias_gelu", "CPU"):
        pytest.skip("vitkernels._C is not built")
    from vitkernels.ops import gelu_mlp as gelu_mlp_module

    if eager_mlp:
        vitkernels_op_or_skip("gelu_mlp_eager")
        linears_on_own_gemm(monkeypatch)
    else:
        monkeypatch.setattr(gelu_mlp_module, "eager_takes_it", lambda *args: False)
    # gelu_mlp_eager is CompositeImplicitAutograd, which a dispatch mode does not see: its calls counted by a wrapper
    eager_calls = []
    if gelu_mlp_module.eager_op_built():
        eager_op = torch.ops.vitkernels.gelu_mlp_eager
        monkeypatch.setattr(torch.ops.vitkernels, "gelu_mlp_eager",
                            lambda *args: eager_calls.append(1) or eager_op(*args))
    kwargs = dict(dim=32, input_resolution=(16, 16), num_heads=2, window_size=8, shift_size=4)
    theirs = randomize(timm_v2().SwinTransformerV2Block(**kwargs))
    assert type(theirs.mlp.act).__module__ == "timm.layers.activations"
    ours = vitkernels.SwinV2Block(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    ours.mlp.act = theirs.mlp.act
    x = torch.randn(2, 16, 16, 32, generator=torch.Generator().manual_seed(0))
    for training in (False, True):
        ours.train(training)
        theirs.train(training)
        with torch.no_grad(), OpCalls() as calls:
            out = ours(x)
        # eval without autograd: in place on the fc1 GEMM's output; in training mode the autograd path's ops (bias +
        # GELU in place there too, on the GEMM's fresh output, as _linear_gelu does without autograd)
        suffix = "" if training else "_"
        assert ("vitkernels::bias_gelu_" in calls.names) != eager_mlp and len(eager_calls) == int(eager_mlp)
        eager_calls.clear()
        assert calls.names.count("vitkernels::bias_layernorm_residual" + suffix) == 2
        assert "aten::gelu" not in calls.names and "aten::native_layer_norm" not in calls.names
        torch.testing.assert_close(out, theirs(x).detach(), rtol=1e-4, atol=1e-5)
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        compare_outputs_and_grads(ours, theirs, x, rtol=1e-4, atol=1e-5)
        eager_calls.clear()  # (compare_outputs_and_grads ran the block too)
        with OpCalls() as calls:
            ours(x.clone().requires_grad_()).sum().backward()
        if eager_mlp:  # its backward: a C++ autograd node on the own GEMM, no bias_gelu_backward
            assert len(eager_calls) == 1 and "vitkernels::bias_gelu_backward" not in calls.names
        else:
            assert "vitkernels::bias_gelu" in calls.names and "vitkernels::bias_gelu_backward" in calls.names
        eager_calls.clear()
        assert calls.names.count("vitkernels::bias_layernorm_residual_backward") == 2
        assert "aten::gelu" not in calls.names and "aten::gelu_backward" not in calls.names
        assert "aten::native_layer_norm_backward" not in calls.names
    # a hook on a module the fused path would call by its weights: timm's code, the hook fires
    fired = []
    ours.mlp.fc1.register_forward_hook(lambda *_: fired.append(1))
    with torch.no_grad(), OpCalls() as calls:
        ours.eval()(x)
    assert fired and "vitkernels::bias_gelu_" not in calls.names and not eager_calls


@pytest.mark.parametrize("attn_drop", [0.0, 0.25], ids=["no-attn-drop", "attn-drop"])
def test_block_fused_cpu_path_drop_path_matches_timm(attn_drop):
    """Training with stochastic depth on the fused CPU path: the post-norm op applies the per-sample factors drawn
    with timm's calls (same random stream: same samples dropped), outputs and gradients as timm's; with attention
    dropout the attention branch is timm's, the MLP seam still fused."""
    if not vitkernels._native.has_kernel("bias_layernorm_residual", "CPU"):
        pytest.skip("vitkernels._C is not built")
    kwargs = dict(dim=32, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2, drop_path=0.5,
                  attn_drop=attn_drop)
    theirs = randomize(timm_v2().SwinTransformerV2Block(**kwargs)).train()
    ours = vitkernels.SwinV2Block(**kwargs).train()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(8, 8, 8, 32, generator=torch.Generator().manual_seed(0))
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    with OpCalls() as calls:
        out_ours = ours(x_ours)
    torch.manual_seed(7)
    out_theirs = theirs(x_theirs)
    assert calls.names.count("vitkernels::bias_layernorm_residual") == (1 if attn_drop else 2)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * max(1.0, q.grad.abs().max().item()),
                                       msg=name)
    if not attn_drop:  # the seed drops some samples' branches and keeps others' (the first draw the block makes)
        torch.manual_seed(7)
        factors = _drop_path_factors(ours.drop_path1, x)
        assert (factors == 0).any() and (factors != 0).any()


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
    # the merged 9 x 10 map is padded to window multiples and shifted
    theirs = randomize(build_timm_swinv2_or_skip(lambda: timm_v2().SwinTransformerV2Stage(**kwargs)).double()).eval()
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


# --- vitkernels.compat.timm.patch_model on timm swinv2_* models ----------------------------------------------------

from vitkernels.compat.timm import patch_model  # noqa: E402

SMALL_SWIN_V2 = dict(img_size=(32, 48), window_size=4, depths=(2, 2), embed_dim=16, num_heads=(1, 2), num_classes=5,
                     pretrained_window_sizes=(3, 0))


def perturb_timm_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """timm's seeded init, made to exercise the attention: timm zeroes the residual post-norms (every block starts
    as the identity, so no gradient would reach the attention) and the q / v biases; here the post-norm weights are
    1 + 0.1 N(0, 1), every bias 0.02 N(0, 1), and logit_scale log(10) + 0.5 N(0, 1) (timm: log(10))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("logit_scale"):
                p.add_(0.5 * r)
            elif ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.02 * r)
    return model


def _timm_model(name, dtype=torch.float64, seed=0, mild=False, **kwargs):
    """A timm model with seeded random weights: every parameter re-drawn (:func:`randomize`), or with ``mild`` timm's
    own init perturbed (:func:`perturb_timm_init`)."""
    timm = import_timm()
    torch.manual_seed(seed)
    # the models' padded, shifted stages need a timm that pads Swin V2's shifted-window masks
    model = build_timm_swinv2_or_skip(lambda: timm.create_model(name, pretrained=False, **kwargs))
    model = perturb_timm_init(model, seed) if mild else randomize(model, seed)
    return model.to(dtype).eval()


def _rel_err(ours, theirs):
    """max |ours - theirs| / max |theirs|."""
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-30)).item()


def _check_patched_model(original, backend, x, out_tol, grad_tol, device="cpu", expected=None):
    """patch_model(deepcopy(original)) against original: same blocks swapped, same state dict, logits and every
    parameter's gradient within the relative errors (max |diff| / max |ref|, per tensor). ``expected`` (the
    original's logits, output gradient and parameter gradients) saves running the original again."""
    patched = patch_model(copy.deepcopy(original), backend=backend)
    blocks = [m for m in patched.modules() if isinstance(m, vitkernels.SwinV2Block)]
    n_timm = sum(type(m).__name__ == "SwinTransformerV2Block" for m in original.modules())
    assert len(blocks) == n_timm and all(b.backend == backend for b in blocks)
    assert not any(type(m).__name__ == "SwinTransformerV2Block" and not isinstance(m, vitkernels.SwinV2Block)
                   for m in patched.modules())
    assert list(patched.state_dict()) == list(original.state_dict())
    x = x.to(device)
    if expected is None:
        expected = _run_model(original, x)
    out_o, grad, grads_o = expected
    out_p, _, grads_p = _run_model(patched, x, grad)
    assert _rel_err(out_p, out_o) < out_tol, _rel_err(out_p, out_o)
    for name, g in grads_o.items():
        if g is None or not g.any():
            continue
        err = _rel_err(grads_p[name], g)
        assert err < grad_tol, (name, err)


def _run_model(model, x, grad=None):
    """(output, output gradient, {parameter name: gradient}) of one forward + backward."""
    out = model(x)
    if grad is None:
        grad = torch.randn_like(out)
    out.backward(grad)
    return out.detach(), grad, {n: p.grad for n, p in model.named_parameters()}


def _backend_or_skip(backend):
    if backend == "native" and "native" in vitkernels.ops.window_attention_v2.op.implementations:
        return "cpu"
    if backend == "native":
        pytest.skip(vitkernels.ops.window_attention_v2.op.reasons(
            vitkernels.dispatch.Call(torch.device("cpu"), torch.float32))["native"])
    if backend == "triton":
        from helpers import triton_interpreter_or_cuda

        device = "cuda" if torch.cuda.is_available() else "cpu"
        triton_interpreter_or_cuda(device)
        if "triton" not in vitkernels.ops.window_attention_v2.op.implementations:
            pytest.skip("no Triton window_attention_v2")
        return device
    return "cpu"


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_patched_small_timm_swinv2_matches_timm(backend):
    device = _backend_or_skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    original = _timm_model("swinv2_tiny_window8_256", dtype, **SMALL_SWIN_V2).to(device)
    x = torch.randn(2, 3, 32, 48, dtype=dtype)
    tol = (1e-9, 1e-9) if dtype == torch.float64 else (1e-4, 1e-3)
    with torch.backends.cudnn.flags(allow_tf32=False):
        _check_patched_model(original, backend, x, *tol, device=device)


@pytest.mark.parametrize("resize", [dict(img_size=(48, 40)), dict(img_size=(48, 40), window_size=6),
                                    dict(img_size=(40, 56), window_size=(4, 6))],
                         ids=["new-resolution", "new-resolution-and-window", "non-square-window"])
def test_set_input_size_on_a_patched_timm_swinv2_matches_timm(resize):
    original = _timm_model("swinv2_tiny_window8_256", **SMALL_SWIN_V2)
    patched = patch_model(copy.deepcopy(original))
    original.set_input_size(**resize)
    patched.set_input_size(**resize)
    blocks = [m for m in patched.modules() if isinstance(m, vitkernels.SwinV2Block)]
    theirs = [m for m in original.modules() if type(m).__name__ == "SwinTransformerV2Block"]
    assert [(b.window_size, b.shift_size, b.input_resolution) for b in blocks] == \
        [(b.window_size, b.shift_size, b.input_resolution) for b in theirs]
    for ours_block, their_block in zip(blocks, theirs):
        assert torch.equal(ours_block.attn.relative_coords_table, their_block.attn.relative_coords_table)
        assert torch.equal(ours_block.attn.relative_position_index, their_block.attn.relative_position_index)
    if "window_size" in resize:
        assert blocks[0].window_size == tuple(resize["window_size"]) if isinstance(resize["window_size"], tuple) \
            else (resize["window_size"],) * 2
    x = torch.randn(2, 3, *resize["img_size"], dtype=torch.float64)
    torch.testing.assert_close(patched(x), original(x), rtol=1e-9, atol=1e-9)


def test_patch_model_swaps_a_single_swinv2_block_sharing_parameters():
    original = _timm_model("swinv2_tiny_window8_256", **SMALL_SWIN_V2)
    block = original.layers[1].blocks[1]  # 4 x 6 input, window 4: shift clamped to (0, 2)
    params = {id(p) for p in block.parameters()}
    ours = patch_model(block)
    assert isinstance(ours, vitkernels.SwinV2Block) and {id(p) for p in ours.parameters()} == params
    assert (ours.window_size, ours.shift_size) == ((4, 4), (0, 2))
    x = torch.randn(2, 4, 6, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), block(x), rtol=1e-10, atol=1e-10)


# The acceptance check: whole timm models (random weights, seeded; every parameter re-drawn so the post-norms
# and q/v biases are not timm's zeros), fp32, logits rel err < 1e-4 and every gradient < 1e-3. To keep CI time small
# swinv2_tiny_window8_256 runs at its native 256 x 256 with batch 1, and swinv2_base_window12to16_192to256 at
# 160 x 224 (the model takes any multiple of 32: stages 40x56 and 20x28 are padded and shifted with window 16 and
# pretrained window 12; 10x14 and 5x7 clamp the window to the map, non-square, pretrained windows 12 and 6).
FULL_MODELS = {
    "swinv2_tiny_window8_256": dict(img=(256, 256), kwargs={}),
    "swinv2_base_window12to16_192to256": dict(img=(160, 224), kwargs=dict(img_size=(160, 224))),
}


@pytest.fixture(scope="module", params=list(FULL_MODELS))
def full_timm_swinv2(request):
    """(the randomised fp32 timm model, its input, timm's logits / output gradient / parameter gradients), built and
    run once per model for every backend."""
    spec = FULL_MODELS[request.param]
    model = _timm_model(request.param, torch.float32, mild=True, num_classes=100, **spec["kwargs"])
    x = torch.randn(1, 3, *spec["img"])
    expected = _run_model(model, x)
    # not vacuous: the backward reaches every attention parameter of every block (incl. logit_scale, cpb MLP)
    attn = {n: g for n, g in expected[2].items() if ".attn." in n}
    assert all(g is not None and g.any() for g in attn.values()), [n for n, g in attn.items() if g is None or not g.any()]
    model.zero_grad(set_to_none=True)
    return model, x, expected


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_patched_full_timm_swinv2_fp32(full_timm_swinv2, backend):
    _backend_or_skip(backend)
    original, x, expected = full_timm_swinv2
    _check_patched_model(original, backend, x, 1e-4, 1e-3, expected=expected)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_fast_block_inference_path_is_bitwise_the_training_arithmetic(backend):
    """Eval + no_grad takes the in-place inference path (residual adds, GELU); it gives exactly the numbers of the
    autograd path and never touches the input."""
    _backend_or_skip(backend)
    block = randomize(vitkernels.SwinV2Block(32, (9, 10), 2, window_size=8, shift_size=4, backend=backend)).eval()
    x = torch.randn(2, 9, 10, 32)
    x_copy = x.clone()
    with torch.no_grad():
        fast = block(x)
    assert torch.equal(x, x_copy)
    slow = block(x)
    assert slow.requires_grad and not fast.requires_grad
    assert torch.equal(fast, slow.detach())
