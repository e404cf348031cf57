"""vitkernels.compat.monai against the real MONAI package: patched vs unpatched 2D and 3D SwinUNETR (v1 and use_v2)
and their Swin stages, outputs and every gradient, each backend; the fallbacks.
Random seeded weights, configs built here, nothing downloaded."""
import copy
import io
import warnings

import pytest
import torch

from vitkernels.compat import monai as vkm

from helpers import (
    OpCalls,
    assert_grads_close,
    linears_on_own_gemm,
    native_or_skip,
    perturb_parameters,
    rel_err,
    triton_interpreter_or_cuda,
    vitkernels_op_or_skip,
)

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")
pytestmark = pytest.mark.monai


def _run(model, x, *args, seed=1):
    torch.manual_seed(seed)  # drop path: the same draws patched and unpatched
    out = model(x, *args)
    out.backward(torch.ones_like(out) + 0.1 * torch.arange(out.numel(), dtype=out.dtype).view(out.shape).cos())
    return out


def _op_calls(monkeypatch):
    """Record the (window, shift) of every fused call."""
    calls = []
    original = vkm.window_attention_pad_first

    def spy(*args, **kwargs):
        calls.append((args[4], args[5]))
        return original(*args, **kwargs)

    monkeypatch.setattr(vkm, "window_attention_pad_first", spy)
    return calls


def swinunetr_2d(**overrides):
    kwargs = dict(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2, depths=(2, 2, 2, 2),
                  num_heads=(1, 2, 2, 4), dropout_path_rate=0.1)
    kwargs.update(overrides)
    return perturb_parameters(swin_unetr.SwinUNETR(**kwargs), 0.1)


def _run_encoder(encoder, x, seed=1):
    """SwinUNETR's Swin encoder (``model.swinViT``): its five normalised feature maps, weighted, summed, backward."""
    torch.manual_seed(seed)
    outs = encoder(x)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
    loss.backward()
    return outs


@pytest.mark.parametrize("backend,use_v2", [("reference", False), ("native", False), ("native", True)])
def test_patched_swinunetr_2d_matches_unpatched(monkeypatch, backend, use_v2):
    """The issue's criterion: fp32 outputs rel. err < 1e-4 (the whole network), input and parameter gradients < 1e-3
    (the Swin encoder in training mode, drop path on: the conv decoder's instance norms over 1x2 maps make the
    whole network's gradients ill-conditioned -- unpatched fp32 itself is ~5e-3 from fp64 there -- while the
    encoder's are at ~1e-6). On a 32 x 64 input the four stages see 16x32, 8x16 (window 7, shift 3, padded before
    the shift), 4x8 (window shrunk to (4, 7) along H only: shift (0, 3), a slice of the bias table) and 2x4 (window
    shrunk along W: MONAI's sliced index, left to MONAI's code)."""
    native_or_skip(backend)
    original = swinunetr_2d(use_v2=use_v2)
    patched = vkm.patch_model(copy.deepcopy(original), backend=backend)
    assert sum(vkm.is_patched(m) for m in patched.modules()) == 8 + 4  # the blocks and their stages
    assert list(patched.state_dict()) == list(original.state_dict())
    calls = _op_calls(monkeypatch)
    x = torch.randn(2, 1, 32, 64)
    with torch.no_grad():
        assert rel_err(patched.eval()(x), original.eval()(x)) < 1e-4
    assert sorted(set(calls)) == [((4, 7), (0, 0)), ((4, 7), (0, 3)), ((7, 7), (0, 0)), ((7, 7), (3, 3))]
    assert len(calls) == 6

    encoder, patched_encoder = original.swinViT.train(), patched.swinViT.train()
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    for out_p, out_o in zip(_run_encoder(patched_encoder, xp), _run_encoder(encoder, xo)):
        assert rel_err(out_p, out_o) < 1e-4
    assert rel_err(xp.grad, xo.grad) < 1e-3
    assert_grads_close(patched_encoder, encoder, 1e-3)


STAGE_CASES = [  # (H, W, window): MONAI BasicLayer (two blocks: unshifted, shifted) with its own mask
    (8, 12, (4, 4)),     # divisible
    (10, 11, (4, 4)),    # padded before the shift
    (3, 11, (4, 4)),     # H <= window: window (3, 4), shift (0, 2), a slice of the bias table
    (9, 10, (3, 5)),     # non-square window
    (11, 3, (4, 4)),     # W <= window: MONAI's sliced index, left to MONAI's code
]


def _stage(window, dtype, dim=12, heads=3):
    layer = swin_unetr.BasicLayer(dim=dim, depth=2, num_heads=heads, window_size=window, drop_path=[0.0, 0.1],
                                  qkv_bias=True, downsample=None)
    return perturb_parameters(layer, 0.1).to(dtype)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", STAGE_CASES, ids=[f"{c[0]}x{c[1]}w{''.join(map(str, c[2]))}" for c in STAGE_CASES])
def test_patched_stage_matches_monai_fp64(backend, case):
    native_or_skip(backend)
    H, W, window = case
    original = _stage(window, torch.float64).train()
    patched = vkm.patch_model(copy.deepcopy(original), backend=backend)
    x = torch.randn(2, 12, H, W, dtype=torch.float64)
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(_run(patched, xp), _run(original, xo), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xp.grad, xo.grad, rtol=1e-9, atol=1e-9)
    grads = dict(patched.named_parameters())
    for name, p in original.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)


def test_patched_stage_triton():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_interpreter_or_cuda(device)
    original = _stage((4, 4), torch.float32, dim=32, heads=2).to(device).train()  # head_dim 16 (the Triton minimum)
    patched = vkm.patch_model(copy.deepcopy(original), backend="triton")
    x = torch.randn(1, 32, 6, 7, device=device)  # padded before the shift: one 8x8 padded map, 4 windows
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert rel_err(_run(patched, xp), _run(original, xo)) < 1e-4
    assert rel_err(xp.grad, xo.grad) < 1e-3
    assert_grads_close(patched, original, 1e-3)


def _op_calls_3d(monkeypatch):
    """Record the (window, shift) of every fused 3D call."""
    calls = []
    original = vkm.window_attention_3d

    def spy(*args, **kwargs):
        calls.append((tuple(args[2]), tuple(args[3])))
        return original(*args, **kwargs)

    monkeypatch.setattr(vkm, "window_attention_3d", spy)
    return calls


def swinunetr_3d(**overrides):
    kwargs = dict(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3, depths=(2, 2, 2, 2),
                  num_heads=(1, 2, 2, 4), dropout_path_rate=0.1)
    kwargs.update(overrides)
    return perturb_parameters(swin_unetr.SwinUNETR(**kwargs), 0.1)


@pytest.mark.parametrize("backend,use_v2", [("reference", False), ("native", False), ("native", True)])
def test_patched_swinunetr_3d_matches_unpatched(monkeypatch, backend, use_v2):
    """The issue's criterion for 3D: fp32 outputs rel. err < 1e-4 (the whole network, eval), input and parameter
    gradients of the Swin encoder < 1e-3 (training mode, drop path on; see the 2D test for why the encoder). On a
    32 x 64 x 64 input (MONAI wants multiples of 32) the four stages see 16x32x32 and 8x16x16 (window 7^3: N = 343,
    shift 3, padded before the shift), 4x8x8 (window shrunk along D only: (4, 7, 7), shift (0, 3, 3), a slice of the
    bias table) and 2x4x4 (shrunk along H and W: MONAI's sliced index, left to MONAI's code)."""
    native_or_skip(backend)
    original = swinunetr_3d(use_v2=use_v2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", vkm.NotPatchedWarning)  # every 3D block is patched
        patched = vkm.patch_model(copy.deepcopy(original), backend=backend)
    assert sum(vkm.is_patched(m) for m in patched.modules()) == 8 + 4  # the blocks and their stages
    assert list(patched.state_dict()) == list(original.state_dict())
    calls = _op_calls_3d(monkeypatch)
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        assert rel_err(patched.eval()(x), original.eval()(x)) < 1e-4
    assert sorted(set(calls)) == [((4, 7, 7), (0, 0, 0)), ((4, 7, 7), (0, 3, 3)), ((7, 7, 7), (0, 0, 0)),
                                  ((7, 7, 7), (3, 3, 3))]
    assert len(calls) == 6

    encoder, patched_encoder = original.swinViT.train(), patched.swinViT.train()
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    for out_p, out_o in zip(_run_encoder(patched_encoder, xp), _run_encoder(encoder, xo)):
        assert rel_err(out_p, out_o) < 1e-4
    assert rel_err(xp.grad, xo.grad) < 1e-3
    assert_grads_close(patched_encoder, encoder, 1e-3)


STAGE_CASES_3D = [  # (D, H, W, window): MONAI BasicLayer (unshifted and shifted block) with its own mask
    (4, 8, 8, (2, 4, 4)),     # divisible
    (5, 7, 6, (2, 3, 4)),     # padded on every axis, before the shift
    (3, 9, 10, (4, 4, 4)),    # D <= window: window (3, 4, 4), shift (0, 2, 2), a slice of the bias table
    (9, 3, 10, (4, 4, 4)),    # H <= window: MONAI's sliced index, left to MONAI's code
]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", STAGE_CASES_3D,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}w{''.join(map(str, c[3]))}" for c in STAGE_CASES_3D])
def test_patched_3d_stage_matches_monai_fp64(backend, case, monkeypatch):
    native_or_skip(backend)
    D, H, W, window = case
    original = _stage(window, torch.float64).train()
    patched = vkm.patch_model(copy.deepcopy(original), backend=backend)
    calls = _op_calls_3d(monkeypatch)
    x = torch.randn(2, 12, D, H, W, dtype=torch.float64)
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(_run(patched, xp), _run(original, xo), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xp.grad, xo.grad, rtol=1e-9, atol=1e-9)
    grads = dict(patched.named_parameters())
    for name, p in original.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)
    quirk = min(H, W) <= max(window[1:])
    assert len(calls) == (0 if quirk else 2)


def test_attention_dropout_in_training_and_missing_mask_fall_back(monkeypatch):
    original = _stage((4, 4), torch.float32)
    original.blocks[1].attn.attn_drop.p = 0.3
    patched = vkm.patch_model(copy.deepcopy(original))
    calls = _op_calls(monkeypatch)
    x = torch.randn(2, 12, 8, 8)
    # block 0 (no attention dropout) is fused, block 1 runs MONAI's code with the same random draws
    torch.testing.assert_close(_run(patched.train(), x), _run(original.train(), x), rtol=1e-5, atol=1e-5)
    assert calls == [((4, 4), (0, 0))]
    # a shifted block called without a mask: MONAI then attends across regions; so does the fallback (its MLP's
    # bias + GELU is still the native pass: float rounding apart, MONAI's numbers)
    block, theirs = patched.blocks[1].eval(), original.blocks[1].eval()
    y = torch.randn(2, 8, 8, 12)
    calls.clear()
    torch.testing.assert_close(block(y, None), theirs(y, None), rtol=1e-6, atol=1e-6)
    assert calls == []


@pytest.mark.parametrize("dims", [2, 3])
def test_mlp_bias_and_gelu_run_as_one_native_pass(dims):
    """forward_part2 on CPU: linear1 without its bias, then bias + GELU in one native pass (in place without
    autograd, bias_gelu with its backward otherwise), MONAI's numbers and gradients; active dropout or a hook on the
    MLP keep MONAI's code."""
    native_or_skip("native")
    window = (4,) * dims
    original = _stage(window, torch.float32).eval()
    patched = vkm.patch_model(copy.deepcopy(original))
    x = torch.randn(2, 12, *(8,) * dims)
    with torch.no_grad(), OpCalls() as calls:
        ours = patched(x)
    assert calls.names.count("vitkernels::bias_gelu_") == 2 and "aten::gelu" not in calls.names
    with torch.no_grad():
        torch.testing.assert_close(ours, original(x), rtol=1e-5, atol=1e-5)
    with OpCalls() as calls:
        _run(patched, x)
    assert calls.names.count("vitkernels::bias_gelu_backward") == 2 and "aten::gelu_backward" not in calls.names
    _run(original, x)
    assert_grads_close(patched, original, 1e-4)
    patched.blocks[0].mlp.drop1.p = 0.1
    patched.blocks[1].mlp.register_forward_hook(lambda *_: None)
    with torch.no_grad(), OpCalls() as calls:
        patched.train()(x)
    assert "vitkernels::bias_gelu_" not in calls.names and calls.names.count("aten::gelu") == 2


def test_use_checkpoint_and_flash_attention_blocks():
    """MONAI's use_checkpoint (checkpoints forward_part1, now the fused one) and use_flash_attention (SDPA at
    inference in MONAI) give the same numbers patched."""
    for kwargs in (dict(use_checkpoint=True), dict(use_flash_attention=True)):
        original = swin_unetr.BasicLayer(dim=12, depth=2, num_heads=3, window_size=(4, 4), drop_path=[0.0, 0.0],
                                         qkv_bias=True, downsample=None, **kwargs)
        original = perturb_parameters(original, 0.1).train()
        patched = vkm.patch_model(copy.deepcopy(original))
        x = torch.randn(2, 12, 10, 9)
        assert rel_err(_run(patched, x), _run(original, x)) < 1e-4
        assert_grads_close(patched, original, 1e-3)
        with torch.no_grad():
            assert rel_err(patched.eval()(x), original.eval()(x)) < 1e-4


def test_parameters_state_dict_unpatch_pickle():
    model = _stage((4, 4), torch.float32).eval()
    params = {name: id(p) for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = torch.randn(1, 12, 9, 10)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 2D model: nothing left, no warning
        vkm.patch_model(model, backend="reference")
    assert {name: id(p) for name, p in model.named_parameters()} == params and list(model.state_dict()) == keys
    assert isinstance(model.blocks[0], swin_unetr.SwinTransformerBlock)
    assert type(model.blocks[0]).__name__ == "FusedSwinTransformerBlock"
    from vitkernels.modules.linear import Linear

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Linear for m in linears)  # the Linear swap (patch_model's linear=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.blocks[0]) is vkm.FusedSwinTransformerBlock and type(loaded) is vkm.FusedBasicLayer
    assert rel_err(loaded(x), expected) < 1e-5
    vkm.patch_model(model, backend="native")
    assert model.blocks[1].vitkernels_backend == "native"
    vkm.unpatch_model(model)
    assert type(model.blocks[0]) is swin_unetr.SwinTransformerBlock and type(model) is swin_unetr.BasicLayer
    assert all(type(m) is torch.nn.Linear for m in linears)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_block_compiles_fullgraph():
    native_or_skip("native")
    layer = vkm.patch_model(_stage((4, 4), torch.float32).eval(), backend="native")
    block = layer.blocks[1]
    mask = swin_unetr.compute_mask([12, 12], (4, 4), (2, 2), None)
    x = torch.randn(2, 10, 11, 12)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), block(x, mask), rtol=1e-5, atol=1e-5)


def _count_masks(monkeypatch):
    """Count MONAI's compute_mask calls (BasicLayer's forward and the deferred mask both look it up in the module)."""
    built = []
    original = swin_unetr.compute_mask

    def spy(*args, **kwargs):
        built.append(tuple(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(swin_unetr, "compute_mask", spy)
    return built


@pytest.mark.parametrize("dims", [2, 3])
def test_stage_builds_its_mask_only_for_monai_code(monkeypatch, dims):
    """A patched BasicLayer hands its blocks a deferred mask: the fused blocks never build it; a block that falls
    back to MONAI's code (here attention dropout while training, or a window shrunk along a later axis) builds it
    once per stage call; a hook on a block (it would see the mask argument) keeps MONAI's forward. The same
    numbers and gradients as MONAI's in each case."""
    native_or_skip("native")
    window = (4,) * dims
    original = _stage(window, torch.float32).train()
    patched = vkm.patch_model(copy.deepcopy(original))
    built = _count_masks(monkeypatch)
    x = torch.randn(2, 12, *(9,) * dims)  # padded before the shift: the shifted block needs the mask
    assert rel_err(_run(patched, x), _run(original, x)) < 1e-5
    assert built == [window]  # MONAI's own stage only
    assert_grads_close(patched, original, 1e-4)
    built.clear()
    with torch.no_grad():
        torch.testing.assert_close(patched.eval()(x), original.eval()(x), rtol=1e-5, atol=1e-5)
    assert built == [window]

    patched.blocks[1].attn.attn_drop.p = original.blocks[1].attn.attn_drop.p = 0.2  # MONAI's code, training
    patched.train(), original.train()
    built.clear()
    assert rel_err(_run(patched, x, seed=3), _run(original, x, seed=3)) < 1e-5
    assert built == [window, window]
    patched.blocks[1].attn.attn_drop.p = original.blocks[1].attn.attn_drop.p = 0.0

    short = torch.randn(1, 12, *(9,) * (dims - 1), 3)  # the last axis <= the window: MONAI's sliced index
    built.clear()
    with torch.no_grad():
        torch.testing.assert_close(patched.eval()(short), original.eval()(short), rtol=1e-5, atol=1e-5)
    assert built == [window[:-1] + (3,)] * 2

    patched.blocks[0].register_forward_pre_hook(lambda module, args: None)
    built.clear()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), original(x), rtol=1e-5, atol=1e-5)
    assert built == [window, window]


def test_stage_compiles_fullgraph(monkeypatch):
    """The patched stage (deferred mask, fused blocks) compiles whole, without building the mask."""
    native_or_skip("native")
    layer = vkm.patch_model(_stage((4, 4, 4), torch.float32).eval(), backend="native")
    built = _count_masks(monkeypatch)
    x = torch.randn(1, 12, 9, 6, 5)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    assert built == []


@pytest.mark.parametrize("dims", [2, 3])
def test_mlp_runs_gelu_mlp_eager_where_the_linears_run_the_own_gemm(dims, monkeypatch):
    """forward_part2 at a width whose Linears run vitkernels' own GEMM (OWN_GEMM, oneDNN as the CPU GEMM: an
    AVX2-only AMD CPU; feature_size 32) runs the whole MLP, both biases included, as vitkernels::gelu_mlp_eager
    (gelu_mlp.eager_takes_it), in inference and training: MONAI's numbers and every gradient, and no separate bias +
    GELU pass; with eager_takes_it False the linear1 + bias_gelu + linear2 path, MONAI's numbers too."""
    native_or_skip("native")
    vitkernels_op_or_skip("gelu_mlp_eager")
    from vitkernels.ops import gelu_mlp as gelu_mlp_module

    linears_on_own_gemm(monkeypatch)
    window = (4,) * dims
    original = _stage(window, torch.float32, dim=32, heads=2).eval()
    patched = vkm.patch_model(copy.deepcopy(original))
    mlp = patched.blocks[0].mlp
    x = torch.randn(2, 32, *(8,) * dims)
    assert gelu_mlp_module.eager_takes_it(torch.empty(8, 32), mlp.linear1.weight, mlp.linear1.bias,
                                          mlp.linear2.weight)
    calls = []
    op = torch.ops.vitkernels.gelu_mlp_eager

    def counting(*args):  # a CompositeImplicitAutograd op, which a dispatch mode does not see
        calls.append(args[4] is not None)  # linear2's bias goes into the op
        return op(*args)

    monkeypatch.setattr(torch.ops.vitkernels, "gelu_mlp_eager", counting)
    with torch.no_grad(), OpCalls() as ops:
        ours = patched(x)
    assert calls == [True, True] and "vitkernels::bias_gelu_" not in ops.names and "aten::gelu" not in ops.names
    with torch.no_grad():
        theirs = original(x)
    assert rel_err(ours, theirs) < 1e-5
    calls.clear()
    with OpCalls() as ops:
        _run(patched.train(), x)
    assert calls == [True, True] and "vitkernels::bias_gelu_backward" not in ops.names
    _run(original.train(), x)
    assert_grads_close(patched, original, 1e-4)
    monkeypatch.setattr(gelu_mlp_module, "eager_takes_it", lambda *args: False)
    calls.clear()
    with torch.no_grad(), OpCalls() as ops:
        ours = patched.eval()(x)
    assert calls == [] and ops.names.count("vitkernels::bias_gelu_") == 2
    assert rel_err(ours, theirs) < 1e-5
