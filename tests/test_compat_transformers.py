"""vitkernels.compat.transformers against the real Hugging Face transformers package: patched vs unpatched Swin,
DonutSwin, MaskFormer-Swin and CLAP-audio models (configs built here, random seeded weights, nothing downloaded),
outputs and every gradient, each backend; the fallbacks; Swin V2 left as is with a warning."""
import copy
import io
import warnings

import pytest
import torch

from vitkernels.compat import transformers as vkt

from helpers import (
    OpCalls,
    assert_grads_close,
    native_or_skip,
    perturb_parameters,
    rel_err,
    triton_interpreter_or_cuda,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers


# geometry: (image, patch, window) -> stage maps
GEOMETRIES = {
    "divisible": (32, 2, 4),      # 16x16 then 8x8, window 4: shifted windows, no padding
    "pad+shift": (44, 4, 5),      # 11x11 then 6x6, window 5: padding *before* the shift (HF's order)
    "map=window": (32, 4, 4),     # 8x8 then 4x4: the last stage's window is the whole map, shift dropped
}


def build(kind: str, geometry: str, dtype=torch.float32, **overrides):
    image, patch, window = GEOMETRIES[geometry]
    common = dict(image_size=image, patch_size=patch, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                  window_size=window, drop_path_rate=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    common.update(overrides)
    if kind == "swin":
        model = transformers.SwinForImageClassification(transformers.SwinConfig(num_labels=5, **common))
    elif kind == "donut":
        model = transformers.DonutSwinModel(transformers.DonutSwinConfig(**common))
    elif kind == "maskformer":
        model = transformers.MaskFormerSwinModel(transformers.MaskFormerSwinConfig(**common))
    else:
        raise ValueError(kind)
    return perturb_parameters(model, 0.3).to(dtype), torch.randn(2, 3, image, image, dtype=dtype)


def _patched_layers(model):
    """The patched Swin / ViT layers of ``model`` (the patch embeddings, patched too, left out)."""
    return [m for m in model.modules() if vkt.is_patched(m) and not type(m).__name__.endswith("PatchEmbeddings")]


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _run(model, x, seed=1):
    torch.manual_seed(seed)  # drop path draws: the same sequence patched and unpatched
    out = _output(model(x))
    out.backward(torch.ones_like(out) + 0.1 * torch.arange(out.numel(), dtype=out.dtype).view(out.shape).sin())
    return out


def _check_patched_matches(original, x, backend, out_tol, grad_tol, train=True):
    original.train(train)
    patched = vkt.patch_model(copy.deepcopy(original), backend=backend)
    layers = _patched_layers(patched)
    assert len(layers) == 4 and all(m.vitkernels_backend == backend for m in layers)
    assert list(patched.state_dict()) == list(original.state_dict())
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_o, out_p = _run(original, xo), _run(patched, xp)
    assert rel_err(out_p, out_o) < out_tol
    assert rel_err(xp.grad, xo.grad) < grad_tol
    assert_grads_close(patched, original, grad_tol)
    return patched


MODEL_CASES = [(kind, geometry) for kind in ("swin", "donut") for geometry in GEOMETRIES] + [
    ("maskformer", "pad+shift"), ("maskformer", "map=window")]  # MaskFormer-Swin never shrinks: 4x4 map, shift 2


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("kind,geometry", MODEL_CASES, ids=[f"{k}-{g}" for k, g in MODEL_CASES])
def test_patched_model_matches_unpatched_fp32(kind, geometry, backend):
    """The issue's criterion: fp32 outputs rel. err < 1e-4, gradients (input and every parameter) < 1e-3, in
    training mode with drop path on."""
    native_or_skip(backend)
    model, x = build(kind, geometry)
    _check_patched_matches(model, x, backend, 1e-4, 1e-3)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("kind", ["swin", "donut"])
def test_patched_model_matches_unpatched_fp64(kind, backend):
    """In float64 the patched model is the same function to ~1e-12: any semantic difference (pad order, mask,
    window clamp) would show here even where fp32 noise could hide it."""
    native_or_skip(backend)
    model, x = build(kind, "pad+shift", torch.float64)
    _check_patched_matches(model, x, backend, 1e-11, 1e-10)


def test_patched_model_matches_unpatched_triton():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_interpreter_or_cuda(device)
    model, x = build("swin", "map=window", image_size=16)  # 4x4 then 2x2 maps: few programs for the interpreter
    _check_patched_matches(model.to(device), x[:1].to(device), "triton", 1e-4, 1e-3)


def test_the_op_is_what_runs(monkeypatch):
    """The patched layers call the fused op (not their original code) in eval and training modes."""
    calls = []
    original_op = vkt.window_attention_pad_first

    def spy(*args, **kwargs):
        calls.append(args[4])  # window
        return original_op(*args, **kwargs)

    monkeypatch.setattr(vkt, "window_attention_pad_first", spy)
    model, x = build("swin", "pad+shift")
    vkt.patch_model(model)
    model.eval()(x)
    model.train()(x)
    assert calls == [(5, 5)] * 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_swin_layers_run_whole_on_the_fused_path(geometry, dtype, monkeypatch):
    """On CPU a SwinLayer runs whole on the fused path (the row ops around the fused attention: in place in
    inference, with their autograd otherwise) with the layer's numbers and gradients; with an active drop path
    (train mode) it runs the layer's code after the attention."""
    native_or_skip("native")
    model, x = build("swin", geometry, dtype)
    patched = vkt.patch_model(copy.deepcopy(model)).eval()
    # each layer's MLP: fc1 + bias_gelu(_) + fc2, or gelu_mlp_eager where its Linears run the own GEMM (float32, AVX2;
    # a CompositeImplicitAutograd op, which a dispatch mode does not see: counted by a wrapper)
    eager_calls = []
    if hasattr(torch.ops.vitkernels, "gelu_mlp_eager"):
        eager_op = torch.ops.vitkernels.gelu_mlp_eager
        monkeypatch.setattr(torch.ops.vitkernels, "gelu_mlp_eager",
                            lambda *args: eager_calls.append(1) or eager_op(*args))
    with torch.no_grad(), OpCalls() as calls:
        ours = _output(patched(x))
    assert calls.names.count("vitkernels::bias_residual_layernorm_") == 4
    assert calls.names.count("vitkernels::bias_gelu_") + len(eager_calls) == 4 and "aten::gelu" not in calls.names
    with torch.no_grad():
        theirs = _output(model.eval()(x))
    assert rel_err(ours, theirs) < (1e-12 if dtype == torch.float64 else 1e-5)
    # grad mode on: the same ops with their autograd; the input's and every parameter's gradients as the layer's
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager_calls.clear()
    with OpCalls() as calls:
        out_p = _run(patched, xp)
    monkeypatch.undo()
    assert calls.names.count("vitkernels::bias_residual_layernorm") == 4
    assert calls.names.count("vitkernels::bias_gelu_backward") + len(eager_calls) == 4
    assert "aten::gelu" not in calls.names
    out_o = _run(model, xo)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_err(out_p, out_o) < tol and rel_err(xp.grad, xo.grad) < tol
    assert_grads_close(patched, model, tol)
    # drop_path_rate 0.1, linearly from 0 over the layers: the layers whose drop path draws fall back
    layers = _patched_layers(patched)
    quiet = sum(getattr(m.drop_path, "drop_prob", 0.0) == 0.0 for m in layers)
    assert 0 < quiet < len(layers) == 4
    with torch.no_grad(), OpCalls() as calls:
        patched.train()(x)
    assert calls.names.count("vitkernels::bias_residual_layernorm_") == quiet


def _forbid_the_op(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the fused op ran where the original code should")

    monkeypatch.setattr(vkt, "window_attention_pad_first", fail)


# The fallback tests compare with the unpatched model bitwise: linear=False keeps the Linears on F.linear (the swap
# to vitkernels.linear changes GEMM rounding; tested on its own in tests/test_linear.py and below with tolerances),
# embeddings=False the patch embeddings on their convolution (the same; tested below).
@pytest.mark.parametrize("how", ["argument", "config"])
def test_output_attentions_falls_back_and_returns_the_weights(monkeypatch, how):
    model, x = build("swin", "divisible")
    model.set_attn_implementation("eager")
    model.eval()
    patched = vkt.patch_model(copy.deepcopy(model), linear=False, embeddings=False)
    _forbid_the_op(monkeypatch)
    if how == "config":
        model.config.output_attentions = patched.config.output_attentions = True
        out_o, out_p = model(x), patched(x)
    else:
        out_o, out_p = model(x, output_attentions=True), patched(x, output_attentions=True)
    assert len(out_p.attentions) == 2
    for a, b in zip(out_p.attentions, out_o.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(out_p.logits, out_o.logits, rtol=0, atol=0)


def test_donut_output_attentions_falls_back(monkeypatch):
    model, x = build("donut", "divisible")
    patched = vkt.patch_model(copy.deepcopy(model.eval()), linear=False, embeddings=False)
    _forbid_the_op(monkeypatch)
    out_o, out_p = model(x, output_attentions=True), patched(x, output_attentions=True)
    assert len(out_p.attentions) == 2
    torch.testing.assert_close(out_p.attentions[-1], out_o.attentions[-1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["swin", "donut"])
def test_attention_dropout_in_training_falls_back(monkeypatch, kind):
    model, x = build(kind, "divisible", attention_probs_dropout_prob=0.3)
    patched = vkt.patch_model(copy.deepcopy(model), linear=False, embeddings=False)
    _forbid_the_op(monkeypatch)
    torch.testing.assert_close(_run(patched.train(), x), _run(model.train(), x), rtol=0, atol=0)


def test_a_registered_attention_function_falls_back(monkeypatch):
    from transformers import AttentionInterface
    from transformers.models.swin.modeling_swin import eager_attention_forward

    used = []

    def custom(*args, **kwargs):
        used.append(True)
        return eager_attention_forward(*args, **kwargs)

    AttentionInterface.register("vitkernels_test_attention", custom)
    model, x = build("swin", "divisible")
    model.set_attn_implementation("vitkernels_test_attention")
    patched = vkt.patch_model(copy.deepcopy(model.eval()), linear=False, embeddings=False)
    expected = model(x).logits
    used.clear()
    _forbid_the_op(monkeypatch)
    torch.testing.assert_close(patched(x).logits, expected, rtol=0, atol=0)
    assert len(used) == 4


def test_hidden_dropout_is_applied_in_original_token_order():
    """hidden_dropout_prob > 0 in training: the fused layer applies nn.Dropout to the projected attention output in
    the original token order (then the MLP's), reproduced here step by step with the same random stream."""
    model, _ = build("swin", "divisible", hidden_dropout_prob=0.25, drop_path_rate=0.0)
    layer = vkt.patch_model(model).swin.encoder.layers[0].blocks[1].train()
    attention = layer.attention
    x = torch.randn(2, 16 * 16, 16)
    torch.manual_seed(3)
    out, weights = layer(x, (16, 16))
    assert weights is None
    with torch.no_grad():
        layer.eval()
        branch = attention.o_proj(vkt.window_attention_pad_first(
            layer.layernorm_before(x).view(2, 16, 16, 16), *vkt._concat_qkv(attention.q_proj, attention.k_proj,
                                                                              attention.v_proj),
            attention.relative_position_bias.relative_position_bias_table, (4, 4), (2, 2), 1, attention.scaling,
        )).reshape(2, 256, 16)
        torch.manual_seed(3)
        hidden = x + torch.nn.functional.dropout(branch, 0.25, training=True)
        expected = hidden + torch.nn.functional.dropout(layer.mlp(layer.layernorm_after(hidden)), 0.25, training=True)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_map_smaller_than_the_window_is_left_to_transformers():
    """When a map side is below the window, SwinLayer shrinks its window below its bias table's and then fails to
    broadcast; the patched layer hands such calls to the original code, which raises the same error."""
    model, x = build("swin", "divisible", image_size=24, patch_size=4, window_size=5)  # 6x6, then 3x3 < 5
    patched = vkt.patch_model(copy.deepcopy(model))
    with pytest.raises(RuntimeError) as theirs:
        model(x)
    with pytest.raises(RuntimeError) as ours:
        patched(x)
    assert str(ours.value) == str(theirs.value)


def test_always_partition_and_a_changing_resolution():
    """SwinLayer keeps the window it shrank to for later calls; always_partition skips the shrink. The patched layer
    follows both (it calls the layer's own set_shift_and_window_size)."""
    model, _ = build("swin", "divisible")
    layer = model.swin.encoder.layers[0].blocks[1].eval()
    fused = vkt.patch_model(copy.deepcopy(layer))
    assert vkt.is_patched(fused)
    for dims, always in [((9, 13), True), ((4, 9), False), ((9, 13), False)]:
        x = torch.randn(2, dims[0] * dims[1], 16)
        expected = layer(x, dims, always_partition=always)[0]
        torch.testing.assert_close(fused(x, dims, always_partition=always)[0], expected, rtol=1e-5, atol=1e-5)
        assert (fused.window_size, fused.shift_size) == (layer.window_size, layer.shift_size)
    assert (fused.window_size, fused.shift_size) == (4, 0)  # shrunk to the 4x9 map, and kept


def test_gradient_checkpointing():
    model, x = build("swin", "divisible")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    _check_patched_matches(model, x, None, 1e-4, 1e-3)


V2_GEOMETRIES = {"divisible": (32, 2, 4), "pad+shift": (44, 4, 5)}  # as GEOMETRIES (Swin V2 never shrinks at run time)


def build_v2(kind, geometry="divisible", dtype=torch.float32):
    if kind == "swinv2":
        image, patch, window = V2_GEOMETRIES[geometry]
        config = transformers.Swinv2Config(image_size=image, patch_size=patch, embed_dim=16, depths=[2, 2],
                                           num_heads=[1, 2], window_size=window, drop_path_rate=0.1)
        model, x = transformers.Swinv2ForImageClassification(config), torch.randn(2, 3, image, image)
    else:  # Swin2SR shares Swinv2's layer
        config = transformers.Swin2SRConfig(image_size=16, embed_dim=16, depths=[2], num_heads=[2], window_size=4,
                                            upscale=2, drop_path_rate=0.1)
        model, x = transformers.Swin2SRForImageSuperResolution(config), torch.randn(2, 3, 16, 16)
    return perturb_parameters(model, 0.3).to(dtype), x.to(dtype)


def _v2_output(out):
    return out.logits if hasattr(out, "logits") else out.reconstruction


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_swin_v2_mlp_and_post_norm_seams_run_as_native_passes(dtype):
    """Swinv2 layers on CPU: the intermediate dense layer without its bias, then bias + GELU in one native pass, and
    each post-norm seam (the attention output's and the MLP output's dense layer, layernorm_before / _after and the
    residual add) after the dense layer's GEMM without its bias as one native pass (in place without autograd, with
    their backwards otherwise), the layers' numbers and gradients."""
    native_or_skip("native")
    original, x = build_v2("swinv2", "pad+shift", dtype)
    patched = vkt.patch_model(copy.deepcopy(original)).eval()
    with torch.no_grad(), OpCalls() as calls:
        ours = _v2_output(patched(x))
    assert calls.names.count("vitkernels::bias_gelu_") == 4 and "aten::gelu" not in calls.names
    assert calls.names.count("vitkernels::bias_layernorm_residual_") == 8
    with torch.no_grad():
        theirs = _v2_output(original.eval()(x))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(ours, theirs) < tol
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with OpCalls() as calls:
        out_p = _v2_output(patched(xp))
        out_p.sum().backward()
    assert calls.names.count("vitkernels::bias_gelu_backward") == 4 and "aten::gelu_backward" not in calls.names
    assert calls.names.count("vitkernels::bias_layernorm_residual_backward") == 8
    out_o = _v2_output(original(xo))
    out_o.sum().backward()
    assert rel_err(xp.grad, xo.grad) < tol * 10
    assert_grads_close(patched, original, tol * 10)
    # a hook on a layer's Swinv2Output (which the fused seam calls by its dense layer's weights): the seam runs
    # transformers' code and the hook fires, the other seams stay fused
    fired = []
    patched.swinv2.encoder.layers[0].blocks[0].output.register_forward_hook(lambda *_: fired.append(1))
    with torch.no_grad(), OpCalls() as calls:
        hooked = _v2_output(patched(x))
    assert fired and calls.names.count("vitkernels::bias_layernorm_residual_") == 7
    assert rel_err(hooked, theirs) < tol


V2_CASES = [("swinv2", "divisible", torch.float32), ("swinv2", "pad+shift", torch.float32),
            ("swin2sr", "divisible", torch.float32), ("swinv2", "pad+shift", torch.float64)]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("kind,geometry,dtype", V2_CASES, ids=[f"{k}-{g}-{str(d)[6:]}" for k, g, d in V2_CASES])
def test_patched_swin_v2_matches_unpatched(kind, geometry, dtype, backend):
    """Swinv2 / Swin2SR on the V2 op, training mode with drop path: fp32 outputs < 1e-4, gradients < 1e-3 (the
    logit scales and the cpb MLP's included); float64 to ~1e-10 (HF's doubled mask, -200 instead of -100, changes
    masked probabilities by e^-100 relative: invisible)."""
    native_or_skip(backend)
    original, x = build_v2(kind, geometry, dtype)
    original.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched = vkt.patch_model(copy.deepcopy(original), backend=backend)
    assert len(_patched_layers(patched)) == (4 if kind == "swinv2" else 2)
    out_tol, grad_tol = (1e-4, 1e-3) if dtype == torch.float32 else (1e-10, 1e-9)
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs = []
    for model, xi in ((original, xo), (patched, xp)):
        torch.manual_seed(1)
        out = _v2_output(model(xi))
        out.backward(torch.ones_like(out) + 0.1 * torch.arange(out.numel(), dtype=out.dtype).view(out.shape).sin())
        outs.append(out)
    assert rel_err(outs[1], outs[0]) < out_tol
    assert rel_err(xp.grad, xo.grad) < grad_tol
    assert_grads_close(patched, original, grad_tol)
    assert any("logit_scale" in n and p.grad is not None for n, p in patched.named_parameters())


def test_swin_v2_output_attentions_falls_back(monkeypatch):
    model, x = build_v2("swinv2")
    patched = vkt.patch_model(copy.deepcopy(model.eval()), linear=False, embeddings=False)
    monkeypatch.setattr(vkt, "window_attention_v2_pad_first",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the fused op ran")))
    out_o, out_p = model(x, output_attentions=True), patched(x, output_attentions=True)
    torch.testing.assert_close(out_p.attentions[-1], out_o.attentions[-1], rtol=0, atol=0)
    torch.testing.assert_close(out_p.logits, out_o.logits, rtol=0, atol=0)


def test_clap_audio_encoder():
    config = transformers.ClapAudioConfig(window_size=4, num_mel_bins=16, spec_size=32, patch_size=4,
                                          patch_stride=(4, 4), hidden_size=32, depths=[2, 2], num_attention_heads=[1, 2],
                                          patch_embeds_hidden_size=16, enable_fusion=False, hidden_dropout_prob=0.0)
    model = perturb_parameters(transformers.ClapAudioModel(config), 0.3).eval()
    patched = vkt.patch_model(copy.deepcopy(model))
    assert len(_patched_layers(patched)) == 4
    x = torch.randn(2, 1, 64, 16)
    assert rel_err(patched(x).last_hidden_state, model(x).last_hidden_state) < 1e-4


def test_parameters_state_dict_unpatch_and_repatch():
    model, x = build("swin", "divisible")
    model.eval()
    params = {name: id(p) for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    expected = model(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unpatched here: no warning
        vkt.patch_model(model, backend="reference")
    assert {name: id(p) for name, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys
    layer = model.swin.encoder.layers[0].blocks[0]
    assert isinstance(layer, transformers.models.swin.modeling_swin.SwinLayer) and type(layer).__name__ == "FusedSwinLayer"
    vkt.patch_model(model, backend="native")  # again: only the backend changes
    assert type(layer).__mro__.count(transformers.models.swin.modeling_swin.SwinLayer) == 1
    assert layer.vitkernels_backend == "native"
    vkt.unpatch_model(model)
    assert type(layer) is transformers.models.swin.modeling_swin.SwinLayer and "vitkernels_backend" not in vars(layer)
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)


def test_a_patched_model_pickles():
    model, x = build("swin", "divisible")
    patched = vkt.patch_model(model.eval())
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.swin.encoder.layers[0].blocks[0]) is vkt.FusedSwinLayer
    torch.testing.assert_close(loaded(x).logits, patched(x).logits, rtol=0, atol=0)


def test_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the patched model without graph breaks (aot_eager: no codegen, to keep
    the test fast; the custom op's fake implementation is what makes this work)."""
    native_or_skip("native")
    model, x = build("swin", "pad+shift")
    patched = vkt.patch_model(model.eval(), backend="native")
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x).logits, patched(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["backbone", "masked-image-modeling"])
def test_other_swin_heads(head):
    """SwinBackbone (feature maps before downsampling) and SwinForMaskedImageModeling run the same patched layers."""
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                     window_size=4, out_features=["stage1", "stage2"], encoder_stride=16)
    if head == "backbone":
        model, outputs = transformers.SwinBackbone(config), lambda out: out.feature_maps
    else:
        model, outputs = transformers.SwinForMaskedImageModeling(config), lambda out: (out.reconstruction,)
    model = perturb_parameters(model, 0.3).eval()
    patched = vkt.patch_model(copy.deepcopy(model))
    assert len(_patched_layers(patched)) == 4
    x = torch.randn(2, 3, 32, 32)
    for ours, theirs in zip(outputs(patched(x)), outputs(model(x))):
        assert rel_err(ours, theirs) < 1e-4


def test_bfloat16_autocast():
    native_or_skip("native")
    model, x = build("swin", "pad+shift")
    patched = vkt.patch_model(copy.deepcopy(model.eval()), backend="native")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        expected = model(x).logits
        out = patched(x).logits
    assert out.dtype == expected.dtype and rel_err(out, expected) < 3e-2


@pytest.mark.parametrize("update", ["in-place", "through-data"])
def test_inference_sees_every_weight_update(update):
    """An EMA teacher (DINO / MSN-style) updates its weights in place between inference calls, often through
    ``.data``, which bumps no version counter: every call must use the current q, k, v weights."""
    model, x = build("swin", "divisible")
    patched = vkt.patch_model(copy.deepcopy(model.eval()))
    with torch.no_grad():
        patched(x)
        for m in (model, patched):
            weight = m.swin.encoder.layers[0].blocks[0].attention.k_proj.weight
            (weight if update == "in-place" else weight.data).mul_(0.5).add_(0.1)
        assert rel_err(patched(x).logits, model(x).logits) < 1e-4
    _check_patched_matches(model, x, None, 1e-4, 1e-3)  # with autograd: gradients reach q, k, v


def test_patched_swin_v2_triton():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_interpreter_or_cuda(device)
    config = transformers.Swinv2Config(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[1, 1],
                                       window_size=4)  # 8x8 then 4x4 maps, head_dim 16 then 32
    original = perturb_parameters(transformers.Swinv2ForImageClassification(config), 0.3).to(device).eval()
    patched = vkt.patch_model(copy.deepcopy(original), backend="triton")
    x = torch.randn(1, 3, 16, 16, device=device)
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_o, out_p = original(xo).logits, patched(xp).logits
    assert rel_err(out_p, out_o) < 1e-4
    out_o.sum().backward()
    out_p.sum().backward()
    assert rel_err(xp.grad, xo.grad) < 1e-3
    assert_grads_close(patched, original, 1e-3)


# --- the patch embeddings: the projection through the fused patch-embedding op --------------------------------------

def _patch_embeddings(model):
    return next(m for m in model.modules() if type(m).__name__.endswith("PatchEmbeddings"))


@pytest.mark.parametrize("kind", ["swin", "donut", "maskformer", "swinv2"])
@pytest.mark.parametrize("size", [(32, 32), (45, 42)], ids=["whole-patches", "padded"])
def test_patch_embeddings_run_the_op_and_match(kind, size, monkeypatch):
    """Each Swin-family patch embedding switches class (same object and projection) and runs the op: tokens and
    output dimensions as the library's, in float64, the image padded at the bottom / right to whole patches as
    ``maybe_pad`` does; the input's and the projection's gradients agree."""
    native_or_skip("native")
    if kind == "swinv2":
        model = transformers.Swinv2Model(transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=16,
                                                                   depths=[2], num_heads=[1], window_size=4))
        model = perturb_parameters(model, 0.3).double()
    else:
        model, _ = build(kind, "pad+shift", torch.float64)
    theirs = _patch_embeddings(model)
    patched = vkt.patch_model(copy.deepcopy(model))
    ours = _patch_embeddings(patched)
    assert type(ours).__mro__[1:].count(type(theirs)) == 1 and vkt.is_patched(ours)
    calls = []
    original_op = vkt.patch_tokens
    monkeypatch.setattr(vkt, "patch_tokens", lambda *a, **k: calls.append(1) or original_op(*a, **k))
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    (tokens_o, dims_o), (tokens_p, dims_p) = theirs(xo), ours(xp)
    assert calls == [1] and dims_p == dims_o and tokens_p.is_contiguous()
    torch.testing.assert_close(tokens_p, tokens_o, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(tokens_o)
    tokens_o.backward(grad)
    tokens_p.backward(grad)
    torch.testing.assert_close(xp.grad, xo.grad, rtol=1e-12, atol=1e-12)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours.projection, name).grad, getattr(theirs.projection, name).grad,
                                   rtol=1e-12, atol=1e-12)


def test_patch_embeddings_fall_back_opt_out_unpatch_and_pickle(monkeypatch):
    """A hook on the projection (it would not fire) and a dtype the weights do not have leave the call to the
    library's forward (its error, its hook); ``embeddings=False`` leaves the class; ``unpatch_model`` restores it;
    a patched model pickles."""
    model, x = build("swin", "divisible")
    model.eval()
    theirs = _patch_embeddings(model)
    assert type(_patch_embeddings(vkt.patch_model(copy.deepcopy(model), embeddings=False))) is type(theirs)
    patched = vkt.patch_model(copy.deepcopy(model))
    ours = _patch_embeddings(patched)
    calls = []
    original_op = vkt.patch_tokens
    monkeypatch.setattr(vkt, "patch_tokens", lambda *a, **k: calls.append(1) or original_op(*a, **k))
    seen = []
    handle = ours.projection.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=0, atol=0)
        handle.remove()
        with pytest.raises(RuntimeError):
            theirs(x.double())
        with pytest.raises(RuntimeError):
            ours(x.double())
        assert seen == [(2, 16, 16, 16)] and calls == []
        ours(x)
        assert calls == [1]
        buffer = io.BytesIO()
        torch.save(patched, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert type(_patch_embeddings(loaded)) is vkt.FusedSwinPatchEmbeddings
        torch.testing.assert_close(loaded(x).logits, patched(x).logits, rtol=0, atol=0)
    vkt.unpatch_model(patched)
    assert type(ours) is type(theirs) and "vitkernels_backend" not in vars(ours)
