"""Whole models through the adapters: Hugging Face ``SwinForImageClassification`` (Swin-T) and ``Dinov2Model``
(DINOv2 ViT-S/14), and MONAI ``SwinUNETR`` (2D and 3D), unpatched vs patched (``vitkernels.compat.transformers`` /
``vitkernels.compat.monai``), eager and ``torch.compile``, inference and a training step, every peer side by side.

Peers: ``transformers`` / ``monai`` (the unpatched model as its library runs it by default: HF's ``sdpa`` attention,
MONAI's eager attention), ``monai sdpa`` (MONAI's ``use_flash_attention=True``: SDPA with the materialised bias +
mask, inference only), the same compiled (``... torch.compile``), and ``vitkernels`` / ``vitkernels torch.compile``
(``patch_model`` with the default backend: native on CPU, Triton on CUDA). Speedups are over the unpatched eager
model (``transformers`` / ``monai``): every other peer is also timed in alternation with it (10 pairs, 4 for the 3D
model on CPU; conftest ``interleaved_speedup``), the report's "speedup, interleaved" column, which a drifting
machine does not skew as it does the ratio of separate medians. Modes: ``inference`` (eval, no_grad) and
``train step`` (train mode; zero grads, forward, a squared-output loss, backward). Every peer's eval output is
checked against the unpatched model's before timing. Random weights, seeded; configs built here.

Shapes: Swin-T 224x224 (batch 64 / 32 on a GPU in bf16; 2 / 1 on CPU in fp32); DINOv2 ViT-S/14 224x224 (257
tokens; batch 128 / 64 on a GPU, 4 / 2 on CPU; the patched layers run the fused CPU row ops in inference, and in
training where the Linears run oneDNN's or vitkernels' own GEMM (AMD CPUs), else the Hugging Face code, as on
GPUs); SwinUNETR 2D feature_size 24 on 256x256 (GPU batch 8 / 4) or 128x128 (CPU, batch 1); SwinUNETR 3D
feature_size 48 on 96^3 (GPU, batch 2 / 1) or feature_size 24 on CPU, batch 1: inference on 64x64x32, a training
step on 64x32x32. The patched 3D model runs the fused 3D window attention (``vitkernels.window_attention_3d``): the
native kernel on CPU, the Triton kernels on a GPU (feature_size 48: head_dim 16; the stages whose window MONAI
shrinks along H or W run MONAI's code). On CPU the compiled peers run inference only (compiling a
whole model's backward takes minutes on 2 cores), and not for the 3D model (over 10 minutes). A smoke run
(``--benchmark-disable``, CI) on CPU uses smaller inputs (MONAI 2D 64x64, 3D 64x32x32), batch 1, and compiles
only the HF Swin.
"""
import copy
import warnings

import pytest
import torch


from conftest import DEVICE, compiled_or_skip, interleaved_speedup, run_benchmark

ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
AGREE_RTOL = 3e-2 if ON_GPU else 1e-3  # relative (norm-wise) error of a peer's eval output vs the unpatched model's

# model kind -> (name, spatial size, feature_size, batch for inference, batch for a training step)
MODELS = {
    "transformers": ("hf swin-t", (224, 224), None, 64 if ON_GPU else 2, 32 if ON_GPU else 1),
    "transformers-dinov2": ("hf dinov2-s/14", (224, 224), None, 128 if ON_GPU else 4, 64 if ON_GPU else 2),
    "monai-2d": ("monai swinunetr-2d", (256, 256) if ON_GPU else (128, 128), 24, 8 if ON_GPU else 1, 4 if ON_GPU else 1),
    "monai-3d": ("monai swinunetr-3d", (96, 96, 96) if ON_GPU else (64, 64, 32), 48 if ON_GPU else 24, 2 if ON_GPU else 1,
                 1),
}
CPU_TRAIN_SIZES = {"monai-3d": (64, 32, 32)}  # a 3D training step at 64x64x32 takes ~10-20 s on 2 cores
SMOKE_SIZES = {"monai-2d": (64, 64), "monai-3d": (64, 32, 32)}  # CPU smoke run
PEERS = ["library", "library sdpa", "library torch.compile", "vitkernels", "vitkernels torch.compile"]
INTERLEAVED_ROUNDS = 10  # pairs timed in alternation with the unpatched eager model
CPU_INTERLEAVED_ROUNDS = {"monai-3d": 4}  # a 3D step takes seconds on 2 cores
MODES = ["inference", "train step"]


def _build(kind, size, feature, batch):
    """(unpatched model, input) with seeded random weights."""
    torch.manual_seed(0)
    if kind == "transformers":
        transformers = pytest.importorskip("transformers")
        model = transformers.SwinForImageClassification(transformers.SwinConfig())  # swin-tiny-patch4-window7-224
        with torch.no_grad():  # HF zero-initialises the bias tables
            for module in model.modules():
                if hasattr(module, "relative_position_bias_table"):
                    module.relative_position_bias_table.normal_(std=0.02)
        x = torch.randn(batch, 3, *size)
    elif kind == "transformers-dinov2":
        transformers = pytest.importorskip("transformers")
        config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                           image_size=size[0], patch_size=14)  # dinov2-small at 224x224
        model = transformers.Dinov2Model(config)
        x = torch.randn(batch, 3, *size)
    else:
        swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")
        model = swin_unetr.SwinUNETR(in_channels=1, out_channels=4, feature_size=feature, spatial_dims=len(size))
        x = torch.randn(batch, 1, *size)
    return model.to(device=DEVICE, dtype=DTYPE), x.to(device=DEVICE, dtype=DTYPE)


_EXPECTED = {}  # (kind, size, batch) -> the unpatched model's eval output, computed once per shape


def _output(out):
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out


def _library_name(kind):
    return "transformers" if kind.startswith("transformers") else "monai"


def _peer_model(kind, peer, model):
    """The peer's model (a copy), or pytest.skip with the reason it does not apply."""
    if peer == "library sdpa":  # MONAI only (test_compat_model skips it for transformers)
        for module in model.modules():
            if hasattr(module, "use_flash_attention"):
                module.use_flash_attention = True  # MONAI: SDPA when autograd is off
        return model
    if peer.startswith("vitkernels"):
        from vitkernels.compat import monai as vk_monai
        from vitkernels.compat import transformers as vk_transformers

        adapter = vk_transformers if kind.startswith("transformers") else vk_monai
        with warnings.catch_warnings():
            warnings.simplefilter("error", adapter.NotPatchedWarning)  # every block must be patched
            adapter.patch_model(model)
    return model


def _rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(MODELS))
def test_compat_model(benchmark, kind, mode, peer):
    name, size, feature, batch_inference, batch_train = MODELS[kind]
    batch = batch_inference if mode == "inference" else batch_train
    if mode != "inference" and not ON_GPU:
        size = CPU_TRAIN_SIZES.get(kind, size)
    if benchmark.disabled and not ON_GPU:  # smoke run
        size, batch = SMOKE_SIZES.get(kind, size), min(batch, 1)
    peer_name = peer.replace("library", _library_name(kind))
    shape = "x".join(map(str, size)) + (f" f{feature}" if feature else "")
    benchmark.group = f"compat {mode} | {name} {shape} b{batch}"
    benchmark.extra_info["peer"] = peer_name
    if peer == "library sdpa" and kind.startswith("transformers"):
        pytest.skip("transformers' default attention is already sdpa (the 'transformers' peer)")
    if peer == "library sdpa" and mode != "inference":
        pytest.skip("MONAI's use_flash_attention applies only when autograd is off")
    compiled = peer.endswith("torch.compile")
    if compiled and not ON_GPU and mode != "inference":
        pytest.skip("not run on CPU: compiling a whole model's backward takes minutes on 2 cores (measured on GPU)")
    if compiled and not ON_GPU and kind == "monai-3d":
        pytest.skip("not run on CPU: compiling the 3D SwinUNETR takes over 10 minutes on 2 cores (measured on GPU)")
    if compiled and not ON_GPU and benchmark.disabled and kind != "transformers":
        pytest.skip("smoke run on CPU: only the HF Swin is compiled (about a minute per peer on 2 cores); the patched "
                    "layers' compile is tested in tests/test_compat_monai.py, tests/test_compat_transformers_vit.py")
    original, x = _build(kind, size, feature, batch)
    model = _peer_model(kind, peer, copy.deepcopy(original))
    fn = compiled_or_skip(model, dynamic=False, ours=peer.startswith("vitkernels")) if compiled else model

    key = (kind, size, batch)
    with torch.no_grad():  # agreement with the unpatched model before timing
        if key not in _EXPECTED:
            _EXPECTED[key] = _output(original.eval()(x))
        model.eval()
        err = _rel_err(_output(fn(x)), _EXPECTED[key])
    assert err < AGREE_RTOL, f"{peer_name} disagrees with the unpatched model: rel. err {err:.2e}"

    run = _step(model, fn, x, mode)
    if peer != "library" and not benchmark.disabled:  # the unpatched eager model in alternation with this peer
        run_baseline = _step(original, original, x, mode)
        pairs = INTERLEAVED_ROUNDS if ON_GPU else CPU_INTERLEAVED_ROUNDS.get(kind, INTERLEAVED_ROUNDS)
        interleaved_speedup(benchmark, run_baseline, run, baseline=_library_name(kind), rounds=pairs)
    del original
    rounds = 5 if not ON_GPU and kind == "monai-3d" else None
    run_benchmark(benchmark, run, peer=peer_name, rounds=rounds)


def _step(model, fn, x, mode):
    """The timed call: ``fn(x)`` without autograd (inference), or a training step of ``model`` through ``fn``
    (train mode; zero grads, forward, a squared-output loss, backward)."""
    if mode == "inference":
        model.eval()

        def run():
            with torch.no_grad():
                return fn(x)
        return run
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        out = _output(fn(x))
        out.float().square().mean().backward()
    return run
