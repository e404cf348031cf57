"""The fused CPU inference path of timm's ViT block (vitkernels/modules/vit.py, switched on by
vitkernels.compat.timm.patch_model): timm's numbers, where it serves and where it leaves timm's code to run."""
import copy
import functools
import io
import pickle

import pytest
import torch
from torch import nn

from vitkernels.compat._patching import is_patched, unpatch_model
from vitkernels.compat.timm import patch_model, patch_vit_blocks
from vitkernels.modules import swin as fast_swin
from vitkernels.modules import vit as fast_vit
from vitkernels.ops import linear as linear_op

from helpers import compile_recording_graphs, import_timm, linears_on_own_gemm, vitkernels_op_or_skip, vitkernels_ops

pytestmark = pytest.mark.timm


def _fused_cpu_or_skip():
    if not fast_swin._FUSED_CPU_AVAILABLE:
        pytest.skip("the native CPU ops are not built")


def _vit(name="deit_tiny_distilled_patch16_224", dtype=torch.float32, **kwargs):
    """A small random timm ViT (32 x 32 images, 16 x 16 patches: 4 patch tokens + the prefix tokens)."""
    timm = import_timm()
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "depth": 2, **kwargs}
    return timm.create_model(name, pretrained=False, **kwargs).to(dtype).eval()


def _official_mae_block(dim=64, heads=4):
    """A block as the official MAE code builds its encoder's and decoder's (timm's Block, nn.LayerNorm eps 1e-6)."""
    import_timm()
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    return Block(dim, heads, 4.0, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).eval()


@pytest.fixture
def fused_calls(monkeypatch):
    """The blocks the fused path served, in call order."""
    calls = []
    forward = fast_vit.forward_fused_cpu
    monkeypatch.setattr(fast_vit, "forward_fused_cpu", lambda block, x: calls.append(block) or forward(block, x))
    return calls


MODELS = {  # id -> (timm model name, create_model kwargs)
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
    "vit-no-qkv-bias-avg-pool": ("vit_tiny_patch16_224", {"qkv_bias": False, "class_token": False,
                                                          "global_pool": "avg"}),
    "vit-dim-96-heads-2-mlp-3": ("vit_tiny_patch16_224", {"embed_dim": 96, "num_heads": 2, "mlp_ratio": 3.0}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(MODELS))
def test_patched_vit_inference_matches_timm(case, dtype, fused_calls):
    """Every block of a patched ViT / DeiT runs the fused path in inference and gives timm's outputs: at float64
    within 1e-10, at float32 as close to a float64 run as timm's own float32 output."""
    _fused_cpu_or_skip()
    name, kwargs = MODELS[case]
    original = _vit(name, dtype, **kwargs)
    patched = patch_model(copy.deepcopy(original))
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        ours, theirs = patched(x), original(x)
    assert len(fused_calls) == 2
    _assert_timms_numbers(ours, theirs, original, x)


def _assert_timms_numbers(ours, theirs, original, x):
    """float64: ``ours`` within 1e-10 of timm's ``theirs``; float32: no further from a float64 run of ``original``
    than twice timm's own float32 error."""
    if x.dtype == torch.float64:
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    else:
        with torch.no_grad():
            exact = copy.deepcopy(original).double()(x.double())
        our_error, their_error = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
        assert our_error <= 2 * their_error + 1e-6, (our_error, their_error)


@pytest.mark.parametrize("inplace", [False, True], ids=["layer-scale", "layer-scale-inplace"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_layer_scale_blocks_run_fused_with_timms_numbers(inplace, dtype, fused_calls):
    """DeiT III / DINOv2 blocks (timm ``LayerScale`` on both branches; random per-channel gammas, in place or not)
    run the fused path with timm's numbers, the gammas untouched."""
    _fused_cpu_or_skip()
    original = _vit("deit3_small_patch16_224", dtype, embed_dim=64, num_heads=2, init_values=1.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for block in original.blocks:
            for ls in (block.ls1, block.ls2):
                assert type(ls).__name__ == "LayerScale"
                ls.inplace = inplace
                ls.gamma.copy_(torch.randn_like(ls.gamma))
    patched = patch_model(copy.deepcopy(original))
    gammas = [p.clone() for n, p in patched.named_parameters() if n.endswith("gamma")]
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        ours, theirs = patched(x), original(x)
    assert len(fused_calls) == 2
    _assert_timms_numbers(ours, theirs, original, x)
    assert all(torch.equal(g, p) for g, p in zip(gammas, (p for n, p in patched.named_parameters()
                                                          if n.endswith("gamma"))))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_timm_gelu_classes_run_fused_with_timms_numbers(act, fused_calls):
    """Blocks built with ``act_layer="gelu"`` / ``"gelu_tanh"`` (timm's own GELU / GELUTanh modules, F.gelu exact
    and tanh) run the fused path with timm's numbers (float64)."""
    _fused_cpu_or_skip()
    import_timm()
    from timm.layers import get_act_layer
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    original = Block(32, 4, qkv_bias=True, act_layer=get_act_layer(act)).double().eval()
    assert type(original.mlp.act).__module__ == "timm.layers.activations"
    patched = patch_model(copy.deepcopy(original))
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ours, theirs = _run(patched, x), _run(original, x)
    assert fused_calls == [patched]
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_official_mae_block_in_inference_mode_matches_timm(fused_calls):
    """The official MAE code's block (nn.LayerNorm, eps 1e-6) under torch.inference_mode, on tokens that are not
    a multiple of anything (the 50 kept tokens + CLS of a masked encoder), float64."""
    _fused_cpu_or_skip()
    original = _official_mae_block().double()
    patched = patch_model(copy.deepcopy(original))
    x = torch.randn(2, 51, 64, dtype=torch.float64)
    with torch.inference_mode():
        ours, theirs = patched(x), original(x)
    assert fused_calls == [patched]
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    assert not x.is_inference()  # the input is only read


def test_drop_path_under_no_grad_in_train_mode_draws_as_timm(fused_calls):
    """Train mode without grad (e.g. a DINO / MSN teacher that is not put in eval mode): the per-sample drop-path
    factors come from timm's calls in timm's order, so with the same seed the outputs are timm's."""
    _fused_cpu_or_skip()
    original = _vit(drop_path_rate=0.5, depth=3).double().train()
    patched = patch_model(copy.deepcopy(original))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = patched(x)
        torch.manual_seed(7)
        theirs = original(x)
    assert len(fused_calls) == 3
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_training_runs_timm_code_bitwise(fused_calls, monkeypatch):
    """With grad mode on where MKL (ATen) is the CPU GEMM (Intel CPUs) the blocks run timm's own code: the same
    outputs and parameter gradients, bitwise."""
    monkeypatch.setattr(linear_op, "CPU_GEMM", "aten")
    original = _vit().train()
    patched = patch_model(copy.deepcopy(original), linear=False)
    x = torch.randn(2, 3, 32, 32)
    for model in (original, patched):
        out = model(x)
        out = (out[0] + out[1]) if isinstance(out, tuple) else out
        out.square().sum().backward()
    assert fused_calls == []
    theirs = dict(original.named_parameters())
    for name, p in patched.named_parameters():
        assert torch.equal(p.grad, theirs[name].grad), name


@pytest.mark.parametrize("own_gemm", [True, False], ids=["own-gemm", "onednn"])
@pytest.mark.parametrize("case", ["deit-drop-path", "deit3-layer-scale"])
def test_training_runs_fused_where_the_linears_run_the_fast_path(case, own_gemm, fused_calls, monkeypatch):
    """With grad mode on where the Linears run the layers' eager fast path (oneDNN as the CPU GEMM, vitkernels' own
    GEMM where it takes them: AMD CPUs) every block runs the fused ops with their backwards: timm's outputs and
    every parameter's and the input's gradients (drop path drawn as timm draws it), to float32 rounding of a
    float64 run; eval mode under no_grad gives the training forward's numbers (drop path off) bitwise."""
    _fused_cpu_or_skip()
    linears_on_own_gemm(monkeypatch, own_gemm)
    if case == "deit-drop-path":
        original = _vit("deit_tiny_patch16_224", embed_dim=64, num_heads=2, drop_path_rate=0.2)
    else:
        original = _vit("deit3_small_patch16_224", embed_dim=64, num_heads=2, init_values=0.5)
    patched = patch_model(copy.deepcopy(original)).train()
    exact = copy.deepcopy(original).double().train()
    x = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for model, inp in ((patched, x), (exact, x.double())):
        inp = inp.clone().requires_grad_()
        torch.manual_seed(3)  # the same drop-path draws
        out = model(inp)
        out.square().sum().backward()
        outs.append(out)
        grads.append({"input": inp.grad, **{n: p.grad for n, p in model.named_parameters()}})
    assert len(fused_calls) == 2
    torch.testing.assert_close(outs[0].double(), outs[1].detach(), rtol=1e-4, atol=1e-4)
    for name, want in grads[1].items():
        torch.testing.assert_close(grads[0][name].double(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item(),
                                   msg=name)
    fused_calls.clear()
    with torch.no_grad():
        eval_out = patched.eval()(x)
    torch.manual_seed(3)
    no_drop = copy.deepcopy(patched).eval()  # eval: drop path off, training forward's ops (grad mode on)
    assert torch.equal(no_drop(x).detach(), eval_out) and len(fused_calls) == 4


def test_patch_keeps_the_objects_and_unpatch_restores_the_class():
    """The class switch keeps the block objects, parameters and state-dict keys; patching twice only updates the
    backend; unpatch_model gives timm's class back."""
    import_timm()
    from timm.models.vision_transformer import Block

    model = _vit()
    blocks, params, keys = list(model.blocks), [id(p) for p in model.parameters()], list(model.state_dict())
    patch_model(model)
    assert [id(b) for b in model.blocks] == [id(b) for b in blocks]
    assert all(isinstance(b, Block) and type(b) is not Block and is_patched(b) for b in model.blocks)
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    patch_vit_blocks(model, backend="reference")
    assert all(b.vitkernels_backend == "reference" for b in model.blocks)
    unpatch_model(model)
    assert all(type(b) is Block for b in model.blocks) and not hasattr(model.blocks[0], "vitkernels_backend")


def test_patched_vit_pickles_and_deep_copies():
    _fused_cpu_or_skip()
    model = patch_model(_vit())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(other.blocks[0]) is type(model.blocks[0])
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def _run(block, x, **kwargs):
    with torch.no_grad():
        return block(x, **kwargs)


@pytest.mark.parametrize("case", ["layer-scale-subclass", "layer-scale-other-dtype", "qk-norm", "silu-mlp",
                                  "attn-mask", "reference-backend", "submodule-hook", "global-hook",
                                  "float32-under-autocast", "cpu-dropout-active"])
def test_blocks_the_fused_path_cannot_serve_run_timm_code(case, fused_calls, monkeypatch):
    """Each block or call outside what the fused path serves (vitkernels/modules/vit.py) runs timm's forward and
    gives timm's output, with hooks firing."""
    import_timm()
    # timm's forward then calls the patched Linears: bitwise timm's where they take ATen's GEMM, as they do on an
    # Intel CPU; pinned here, since elsewhere (AMD: oneDNN, vitkernels/ops/linear.py) their rounding differs
    monkeypatch.setattr(linear_op, "CPU_GEMM", "aten")
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    kwargs = {"init_values": 0.5} if case.startswith("layer-scale") else {"qk_norm": True} if case == "qk-norm" \
        else {}
    if case == "silu-mlp":  # not a GELU: the fused ops compute GELU only
        kwargs["act_layer"] = torch.nn.SiLU
    original = Block(32, 4, qkv_bias=True, proj_drop=0.1 if case == "cpu-dropout-active" else 0.0, **kwargs).eval()
    if case == "cpu-dropout-active":
        original.train()
    if case == "layer-scale-subclass":  # a LayerScale with its own forward: not timm's x * gamma
        class DoubledLayerScale(type(original.ls2)):
            def forward(self, x):
                return 2 * x * self.gamma

        original.ls2.__class__ = DoubledLayerScale
    if case == "layer-scale-other-dtype":  # a gamma of another dtype than the tokens': not served
        original.ls1.gamma.data = original.ls1.gamma.data.bfloat16()
    patched = patch_model(copy.deepcopy(original), backend="reference" if case == "reference-backend" else None)
    x = torch.randn(2, 5, 32)
    call = {}
    if case == "attn-mask":
        call["attn_mask"] = torch.randn(2, 1, 5, 5)
    fired = []
    if case == "submodule-hook":
        patched.mlp.register_forward_hook(lambda *_: fired.append(1))
    handle = None
    if case == "global-hook":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: fired.append(1))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "float32-under-autocast"):
            torch.manual_seed(1)
            ours = _run(patched, x, **call)
            torch.manual_seed(1)
            theirs = _run(original, x, **call)
    finally:
        if handle is not None:
            handle.remove()
    assert fused_calls == []
    assert torch.equal(ours, theirs)
    if case in ("submodule-hook", "global-hook"):
        assert fired


def test_bfloat16_vit_inference_is_as_close_to_float64_as_timm(fused_calls):
    """A ViT converted to bfloat16 whole (weights and images) runs the fused path; its error against float64 is
    within 1.5x timm's bfloat16 error."""
    _fused_cpu_or_skip()
    original = _vit(depth=3)
    exact_model = copy.deepcopy(original).double()
    patched = patch_model(copy.deepcopy(original).bfloat16())
    theirs_model = copy.deepcopy(original).bfloat16()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exact = exact_model(x.double())
        ours, theirs = patched(x.bfloat16()), theirs_model(x.bfloat16())
    assert ours.dtype == theirs.dtype == torch.bfloat16 and len(fused_calls) == 3

    def rel(t):
        return ((t.double() - exact).norm() / exact.norm()).item()

    assert rel(ours) <= max(1.5 * rel(theirs), 1e-2), (rel(ours), rel(theirs))


@pytest.mark.parametrize("case", ["deit", "deit3-layer-scale"])
def test_compiled_patched_vit_runs_the_fused_ops_fullgraph(case):
    """torch.compile(fullgraph=True, dynamic=True) of a patched ViT in inference traces the fused path (the in-place
    custom ops, through their fake kernels; aot_eager: no codegen, to keep it quick) and gives eager's outputs, at
    two batch sizes."""
    _fused_cpu_or_skip()
    original = _vit() if case == "deit" else _vit("deit3_small_patch16_224", embed_dim=64, num_heads=2, init_values=0.5)
    patched = patch_model(copy.deepcopy(original))
    compiled, graphs = compile_recording_graphs(patched, dynamic=True)
    for n in (2, 3):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            out = compiled(x)
            torch.testing.assert_close(out, patched(x), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out, original(x), rtol=1e-4, atol=1e-5)
    ops = vitkernels_ops(graphs)
    # one graph (fullgraph) for both batch sizes (dynamic): two blocks' ops once
    # each MLP: fc1 + bias_gelu_ + fc2, or gelu_mlp_own where the Linears run the own GEMM (AVX2-only AMD CPUs)
    assert ops["bias_residual_layernorm_"] == ops["bias_gelu_"] + ops["gelu_mlp_own"] == ops["bias_residual_"] == 2, ops


@pytest.mark.parametrize("layer_scale", [False, True], ids=["plain", "layer-scale"])
def test_mlp_runs_gelu_mlp_eager_where_the_linears_run_the_own_gemm(layer_scale, fused_calls, monkeypatch):
    """Where the Linears run vitkernels' own GEMM (OWN_GEMM, oneDNN as the CPU GEMM: an AVX2-only AMD CPU) the fused
    path runs a block's MLP as vitkernels::gelu_mlp_eager (bias + GELU in fc1's GEMM epilogue, gelu_mlp.eager_takes_it;
    fc2's bias added by the residual op after it, or with LayerScale in fc2's GEMM, whose biased output its gamma
    scales: timm's product order), timm's numbers; with eager_takes_it False the block runs fc1 + bias_gelu_ + fc2,
    the same numbers bitwise (the same GEMM and GELU code)."""
    _fused_cpu_or_skip()
    vitkernels_op_or_skip("gelu_mlp_eager")
    from vitkernels.ops import gelu_mlp as gelu_mlp_module

    linears_on_own_gemm(monkeypatch)
    kwargs = {"init_values": 0.5} if layer_scale else {}
    original = _vit("deit3_small_patch16_224" if layer_scale else "deit_tiny_patch16_224", embed_dim=64,
                    num_heads=2, **kwargs)
    patched = patch_model(copy.deepcopy(original))
    mlp = patched.blocks[0].mlp
    assert gelu_mlp_module.eager_takes_it(torch.empty(8, 64), mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight)
    calls = []
    op = torch.ops.vitkernels.gelu_mlp_eager
    monkeypatch.setattr(torch.ops.vitkernels, "gelu_mlp_eager", lambda *args: calls.append(args[4]) or op(*args))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = patched(x), original(x)
    assert len(fused_calls) == 2
    # fc2's bias: the residual op's, or with LayerScale the MLP op's
    fc2_biases = [block.mlp.fc2.bias for block in patched.blocks] if layer_scale else [None, None]
    assert len(calls) == 2 and all(b is want for b, want in zip(calls, fc2_biases))
    _assert_timms_numbers(ours, theirs, original, x)
    monkeypatch.setattr(gelu_mlp_module, "eager_takes_it", lambda *args: False)
    calls.clear()
    with torch.no_grad():
        unfused = patched(x)
    assert calls == []
    assert torch.equal(unfused, ours)
