"""vitkernels.compat.transformers on the Hugging Face ViT family (ViT, DeiT, ViT-MAE, ViT-MSN, I-JEPA, DINOv2,
DINOv2 with registers; configs built here, random perturbed weights, nothing downloaded): in inference each layer
runs the fused CPU row ops (vitkernels.modules.vit.fused_block_cpu) with the unpatched model's numbers, and in
training too where the Linears run the fast path (AMD CPUs); everything it does not serve runs the Hugging Face code
bitwise."""
import copy
import io

import pytest
import torch

from vitkernels.compat import transformers as vkt
from vitkernels.modules import swin as fast_swin
from vitkernels.ops import linear as linear_op

from helpers import compile_recording_graphs, linears_on_own_gemm, perturb_parameters, rel_err, vitkernels_ops

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)


def build(kind, dtype=torch.float64, attn="sdpa", **overrides):
    """A small random ``kind`` model (16 x 16 images, 4 x 4 patches: 16 patch tokens + the prefix tokens) in eval
    mode, its parameters perturbed (zero biases and unit LayerScales would hide a wrong one)."""
    t = transformers
    config = {**SMALL, **overrides}
    mlp = {"intermediate_size": 48}
    makers = {
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(num_labels=3, **mlp, **config)),
        "deit": lambda: t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(num_labels=3, **mlp, **config)),
        "vit-mae": lambda: t.ViTMAEForPreTraining(t.ViTMAEConfig(
            decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=24, mask_ratio=0.5, **mlp, **config)),
        "vit-msn": lambda: t.ViTMSNModel(t.ViTMSNConfig(**mlp, **config)),
        "ijepa": lambda: t.IJepaModel(t.IJepaConfig(**mlp, **config)),
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(mlp_ratio=2, **config)),
        "dinov2-registers": lambda: t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
            mlp_ratio=2, num_register_tokens=4, **config)),
    }
    torch.manual_seed(0)
    model = makers[kind]()
    model.set_attn_implementation(attn)
    return perturb_parameters(model, 0.3).to(dtype).eval()


def output(model, x, seed=1):
    torch.manual_seed(seed)  # ViT-MAE's random masking: the same draw for every model
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def fused_calls(monkeypatch):
    """The layers the fused path served, in call order."""
    calls = []
    forward = vkt._FusedViTLayer._vk_forward_fused
    monkeypatch.setattr(vkt._FusedViTLayer, "_vk_forward_fused",
                        lambda self, x, plan: calls.append(self) or forward(self, x, plan))
    return calls


def _fused_cpu_or_skip():
    if not fast_swin._FUSED_CPU_AVAILABLE:
        pytest.skip("the native CPU ops are not built")


KINDS = ["vit", "deit", "vit-mae", "vit-msn", "ijepa", "dinov2", "dinov2-registers"]
LAYERS = {"vit-mae": 3}  # encoder and decoder layers; two elsewhere


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_runs_fused_with_the_unpatched_numbers(kind, dtype, attn, fused_calls):
    """Every layer is served. float64: within 1e-10 of the unpatched model on SDPA (its ``eager`` attention takes
    the softmax in float32, so there within 1e-6); float32: no further from a float64 run than twice the unpatched
    model's own float32 error."""
    _fused_cpu_or_skip()
    original = build(kind, dtype, attn)
    patched = vkt.patch_model(copy.deepcopy(original))
    assert sum(isinstance(m, vkt._FusedViTLayer) for m in patched.modules()) == LAYERS.get(kind, 2)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        ours, theirs = output(patched, x), output(original, x)
        exact = output(build(kind, torch.float64, "sdpa"), x.double())
    assert len(fused_calls) == LAYERS.get(kind, 2)
    if dtype == torch.float64:
        torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    else:
        our_error, their_error = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
        assert our_error <= 2 * their_error + 1e-6, (our_error, their_error)


TRAINING_ON_LAYER_CODE = {  # case -> (kind, build overrides, the CPU GEMM)
    "vit-mkl": ("vit", {}, "aten"),
    "dinov2-mkl": ("dinov2", {}, "aten"),
    "vit-hidden-dropout": ("vit", {"hidden_dropout_prob": 0.1}, "onednn"),
    "dinov2-drop-path": ("dinov2", {"drop_path_rate": 0.2}, "onednn"),
}


@pytest.mark.parametrize("case", list(TRAINING_ON_LAYER_CODE))
def test_training_runs_the_hugging_face_code_bitwise(case, fused_calls, monkeypatch):
    """With grad mode on (training, or a no-grad-less eval call) where MKL (ATen) is the CPU GEMM (Intel CPUs), or
    anywhere with an active hidden dropout or drop path, the layers run their own code: outputs and every gradient
    bitwise the unpatched model's."""
    kind, overrides, gemm = TRAINING_ON_LAYER_CODE[case]
    if gemm == "onednn":
        linears_on_own_gemm(monkeypatch)
    else:
        monkeypatch.setattr(linear_op, "CPU_GEMM", gemm)
    original = build(kind, torch.float32, **overrides).train()
    patched = vkt.patch_model(copy.deepcopy(original), linear=False)
    x = torch.randn(2, 3, 16, 16)
    results = []
    for model in (patched, original):
        out = output(model, x)
        out.pow(2).sum().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert fused_calls == []
    assert torch.equal(results[0][0], results[1][0])
    assert all(g is None and results[0][1][n] is None or torch.equal(results[0][1][n], g)
               for n, g in results[1][1].items())


@pytest.mark.parametrize("own_gemm", [True, False], ids=["own-gemm", "onednn"])
@pytest.mark.parametrize("kind", ["vit", "dinov2", "vit-mae"])
def test_training_runs_fused_where_the_linears_run_the_fast_path(kind, own_gemm, fused_calls, monkeypatch):
    """With grad mode on where the Linears run the layers' eager fast path (oneDNN as the CPU GEMM, vitkernels' own
    GEMM where it takes them: AMD CPUs) every layer runs the fused ops with their backwards (DINOv2: LayerScale;
    ViT-MAE: encoder and decoder): the unpatched model's outputs and every parameter's and the input's gradients
    (the q, k, v weights through their per-call concatenation) to float32 rounding of a float64 run; the same
    model in eval mode with grad mode on is served too."""
    _fused_cpu_or_skip()
    linears_on_own_gemm(monkeypatch, own_gemm)
    original = build(kind, torch.float32).train()
    patched = vkt.patch_model(copy.deepcopy(original))
    exact = copy.deepcopy(original).double()
    x = torch.randn(2, 3, 16, 16)
    outs, grads = [], []
    for model, inp in ((patched, x), (exact, x.double())):
        inp = inp.clone().requires_grad_()
        out = output(model, inp)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({"input": inp.grad, **{n: p.grad for n, p in model.named_parameters()}})
    assert len(fused_calls) == LAYERS.get(kind, 2)
    torch.testing.assert_close(outs[0].double(), outs[1], rtol=1e-4, atol=1e-4)
    for name, want in grads[1].items():
        if want is None:  # parameters the loss does not reach (ViT-MAE's mask token, ...)
            assert grads[0][name] is None, name
            continue
        # the key bias's gradient is zero but for rounding (each softmax row is invariant to a shift): its float32
        # noise is measured on the scale of the query bias's
        scale = grads[1][name.replace("k_proj", "q_proj")] if name.endswith("k_proj.bias") else want
        torch.testing.assert_close(grads[0][name].double(), want, rtol=1e-3, atol=1e-4 * scale.abs().max().item(),
                                   msg=name)
    fused_calls.clear()
    output(patched.eval(), x).sum().backward()
    assert len(fused_calls) == LAYERS.get(kind, 2)


FALLBACKS = {  # case -> (kind, build overrides)
    "gelu-new": ("vit", {"hidden_act": "gelu_new"}),
    "swiglu-mlp": ("dinov2", {"use_swiglu_ffn": True}),
    "layer-scale-other-dtype": ("dinov2", {}),
    "hidden-dropout-active": ("vit", {"hidden_dropout_prob": 0.2}),
    "drop-path-active": ("dinov2", {"drop_path_rate": 0.2}),
    "attention-dropout-active": ("vit", {"attention_probs_dropout_prob": 0.2}),
    "output-attentions": ("vit", {}),
    "submodule-hook": ("dinov2", {}),
    "global-hook": ("vit", {}),
    "reference-backend": ("vit", {}),
    "float32-under-autocast": ("dinov2", {}),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_calls_the_fused_path_does_not_serve_run_the_hugging_face_code(case, fused_calls):
    """Each layer or call outside what the fused path serves runs the layer's own forward: the unpatched model's
    output bitwise (same seeds), hooks firing, attention weights returned."""
    kind, overrides = FALLBACKS[case]
    original = build(kind, torch.float32, "eager" if case == "output-attentions" else "sdpa", **overrides)
    if case.endswith("-active"):
        original.train()
    if case == "layer-scale-other-dtype":  # a lambda1 of another dtype than the tokens': not served
        for layer in original.encoder.layer:
            layer.layer_scale1.lambda1.data = layer.layer_scale1.lambda1.data.bfloat16()
    patched = vkt.patch_model(copy.deepcopy(original), backend="reference" if case == "reference-backend" else None,
                              linear=False)
    fired, handle = [], None
    if case == "submodule-hook":
        for layer in patched.encoder.layer:
            layer.mlp.register_forward_hook(lambda *_: fired.append(1))
    if case == "global-hook":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: fired.append(1))
    x = torch.randn(2, 3, 16, 16)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "float32-under-autocast"):
            if case == "output-attentions":
                ours, theirs = patched(x, output_attentions=True), original(x, output_attentions=True)
                assert len(ours.attentions) == 2 and all(torch.equal(a, b)
                                                         for a, b in zip(ours.attentions, theirs.attentions))
                ours, theirs = ours.logits, theirs.logits
            else:
                ours, theirs = output(patched, x), output(original, x)
    finally:
        if handle is not None:
            handle.remove()
    assert fused_calls == []
    assert torch.equal(ours, theirs)
    if case.endswith("hook"):
        assert fired


def test_hidden_states_are_served_and_transformers_capture_hooks_do_not_turn_the_path_off(fused_calls):
    """``output_hidden_states`` runs the fused layers (transformers records them around each layer); asking for
    attention weights falls back, and the output-capturing hooks transformers then leaves on the layers and their
    attention do not keep later calls off the fused path."""
    _fused_cpu_or_skip()
    original = build("dinov2", torch.float64, "eager")
    patched = vkt.patch_model(copy.deepcopy(original))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = patched(x, output_hidden_states=True), original(x, output_hidden_states=True)
        assert len(fused_calls) == 2 and len(ours.hidden_states) == len(theirs.hidden_states) == 3
        for a, b in zip(ours.hidden_states, theirs.hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        ours, theirs = patched(x, output_attentions=True), original(x, output_attentions=True)
        assert len(fused_calls) == 2 and len(ours.attentions) == 2
        assert all(torch.equal(a, b) for a, b in zip(ours.attentions, theirs.attentions))
        assert any(m._forward_hooks for m in patched.encoder.layer[0].modules())  # transformers' hooks stay
        torch.testing.assert_close(output(patched, x), output(original, x), rtol=1e-10, atol=1e-10)
    assert len(fused_calls) == 4


def test_bfloat16_model_is_as_close_to_float64_as_the_unpatched_one(fused_calls):
    """A DINOv2 converted to bfloat16 whole runs the fused path; its error against float64 is within 1.5x the
    unpatched bfloat16 model's."""
    _fused_cpu_or_skip()
    original = build("dinov2", torch.float32)
    patched = vkt.patch_model(copy.deepcopy(original).bfloat16())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        exact = output(copy.deepcopy(original).double(), x.double())
        ours, theirs = output(patched, x.bfloat16()), output(copy.deepcopy(original).bfloat16(), x.bfloat16())
    assert ours.dtype == theirs.dtype == torch.bfloat16 and len(fused_calls) == 2
    assert rel_err(ours, exact) <= max(1.5 * rel_err(theirs, exact), 1e-2), (rel_err(ours, exact),
                                                                                rel_err(theirs, exact))


def test_patch_keeps_objects_pickles_and_unpatches():
    """The class switch keeps the layer objects, parameters and state-dict keys; a patched model pickles and loads
    (the fused classes resolve by name); ``unpatch_model`` restores the Hugging Face classes."""
    original = build("dinov2-registers", torch.float32)
    layers = list(original.encoder.layer)
    keys = list(original.state_dict())
    patched = vkt.patch_model(original)
    assert list(patched.encoder.layer) == layers and list(patched.state_dict()) == keys
    assert type(layers[0]).__name__ == "FusedDinov2WithRegistersLayer" and vkt.is_patched(layers[0])
    assert isinstance(layers[0], transformers.models.dinov2_with_registers.modeling_dinov2_with_registers
                      .Dinov2WithRegistersLayer)
    x = torch.randn(2, 3, 16, 16)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, x), output(patched, x), rtol=0, atol=0)
    vkt.unpatch_model(patched)
    assert type(layers[0]) is transformers.models.dinov2_with_registers.modeling_dinov2_with_registers \
        .Dinov2WithRegistersLayer


def test_compiles_fullgraph_with_the_fused_ops():
    """torch.compile(fullgraph=True) of a patched ViT in inference traces the fused path (aot_eager: no codegen)
    and gives eager's outputs."""
    _fused_cpu_or_skip()
    patched = vkt.patch_model(build("vit", torch.float32))
    compiled, graphs = compile_recording_graphs(patched)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(output(compiled, x), output(patched, x), rtol=1e-6, atol=1e-6)
    ops = vitkernels_ops(graphs)
    # each MLP: fc1 + bias_gelu_ + fc2, or gelu_mlp_own where the Linears run the own GEMM (AVX2-only AMD CPUs)
    assert ops["bias_residual_layernorm_"] == ops["bias_gelu_"] + ops["gelu_mlp_own"] == ops["bias_residual_"] == 2, ops
