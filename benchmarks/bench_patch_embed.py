"""Fused ViT patch embedding vs timm's Conv2d + flatten + cat + add (``patch_embed`` then ``_pos_embed``).

Peers per shape and mode (``fwd``: inference; ``fwd+bwd``: a training step of the embedding -- the parameters
(weight, bias, pos_embed, cls_token) need gradients, the image does not, as in ViT training):

* ``timm eager``: a timm ``VisionTransformer`` (depth 0)'s ``_pos_embed(patch_embed(x))``;
* ``timm torch.compile``: the same function compiled (inductor);
* ``reference eager``: :func:`vitkernels.reference.patch_embed.patch_embed` (reshape patchify + matmul + cat + add);
* ``vitkernels native`` / ``vitkernels triton``: :func:`vitkernels.patch_embed` on that backend, where it runs.

Issue-sized shapes on CUDA (ViT-B/16 at 224 and 384, batch 256, bf16; target: fwd+bwd >= 1.3x timm eager and
>= 1.0x timm torch.compile); on CPU the same models at batch 2 in fp32. Every peer's output (and parameter
gradients for fwd+bwd) is checked against the float64 reference before timing.
"""
import pytest
import torch

import vitkernels
from vitkernels.reference import patch_embed as reference

from conftest import DEVICE, TRITON_ON_CPU, assert_agrees, compiled_or_skip, run_benchmark, timm_or_skip

BATCH = 256 if DEVICE.type == "cuda" else 2
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# (name, batch, image size, patch, embed dim)
SHAPES = [
    (f"vit-b16 224 b{BATCH}", BATCH, 224, 16, 768),
    (f"vit-b16 384 b{BATCH}", BATCH, 384, 16, 768),
]
MODES = ["fwd", "fwd+bwd"]


def _timm_model(img, patch, dim):
    timm_or_skip()
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=0, num_heads=12, num_classes=0)
    return model.to(device=DEVICE, dtype=DTYPE)


def _params(model):
    return (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.pos_embed, model.cls_token)


def _peers():
    def timm_eager(model):
        return lambda x: model._pos_embed(model.patch_embed(x))

    def timm_compiled(model):
        return compiled_or_skip(timm_eager(model), dynamic=False)

    def reference_eager(model):
        w, b, pos, cls = _params(model)
        return lambda x: reference.patch_embed(x, w, b, pos, cls)

    def backend(name):
        def make(model):
            w, b, pos, cls = _params(model)
            fn = lambda x: vitkernels.patch_embed(x, w, b, pos, cls, backend=name)  # noqa: E731
            try:
                probe = torch.zeros(1, 3, 16, 16, device=DEVICE, dtype=DTYPE)
                vitkernels.patch_embed(probe, torch.zeros(4, 3, 16, 16, device=DEVICE, dtype=DTYPE), backend=name)
            except vitkernels.BackendUnavailableError as exc:
                pytest.skip(str(exc))
            if name == "triton" and DEVICE.type == "cpu":
                pytest.skip(TRITON_ON_CPU)
            return fn

        return make

    yield "timm eager", timm_eager
    yield "timm torch.compile", timm_compiled
    yield "reference eager", reference_eager
    yield "vitkernels native", backend("native")
    yield "vitkernels triton", backend("triton")


PEERS = list(_peers())


@pytest.mark.parametrize("peer,make", PEERS, ids=[p for p, _ in PEERS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_patch_embed(benchmark, shape, mode, peer, make):
    name, B, img, patch, dim = shape
    benchmark.group = f"patch_embed {mode} | {name}"
    benchmark.extra_info["peer"] = peer
    model = _timm_model(img, patch, dim)
    fn = make(model)
    x = torch.randn(B, 3, img, img, device=DEVICE, dtype=DTYPE)
    L = (img // patch) ** 2
    e = x.element_size()
    params = _params(model)
    param_bytes = sum(p.numel() for p in params) * e
    out_bytes = B * (L + 1) * dim * e
    gemm_flops = 2 * B * L * (3 * patch * patch) * dim
    grad = torch.randn(B, L + 1, dim, device=DEVICE, dtype=DTYPE)
    p64 = [p.detach().double().requires_grad_() for p in params]
    expected = reference.patch_embed(x.double(), *p64)
    if mode == "fwd":
        with torch.no_grad():
            assert_agrees(benchmark, fn(x), expected)
    else:
        assert_agrees(benchmark, (fn(x),) + torch.autograd.grad(fn(x), params, grad),
                      (expected,) + torch.autograd.grad(expected, p64, grad.double()))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x)

        run_benchmark(benchmark, step, peer=peer, bytes_moved=x.numel() * e + param_bytes + out_bytes,
                      flops=gemm_flops)
    else:
        def step():
            out = fn(x)
            return torch.autograd.grad(out, params, grad)

        # forward (image, params, output) + backward (grad in, image again for dW, param grads out)
        moved = 2 * x.numel() * e + 3 * param_bytes + 2 * out_bytes
        run_benchmark(benchmark, step, peer=peer, bytes_moved=moved, flops=2 * gemm_flops)
