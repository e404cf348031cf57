"""Fused shift + window partition vs timm's roll + pad + partition copies (Swin-T stage shapes); every peer's output
checked against the reference before timing."""
import pytest
import torch

import vitkernels
from vitkernels.reference import window_partition as reference

from conftest import DEVICE, TRITON_ON_CPU, assert_agrees, compiled_or_skip, run_benchmark

# (name, B, H, W, C, window, shift); batch 128 on a GPU, 8 on CPU.
BATCH = 128 if DEVICE.type == "cuda" else 8
SHAPES = [
    ("swin-t stage1 56x56x96 ws7 s3", BATCH, 56, 56, 96, 7, 3),
    ("swin-t stage3 14x14x384 ws7 s3", BATCH, 14, 14, 384, 7, 3),
]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _peers():
    def eager(x, ws, s):
        return reference.window_partition(x, (ws, ws), (s, s))

    yield "reference eager", lambda: eager
    yield "reference torch.compile", lambda: compiled_or_skip(eager, dynamic=False)
    for backend in ("native", "triton"):
        yield f"vitkernels {backend}", (lambda b: lambda: _backend_or_skip(b))(backend)


def _backend_or_skip(backend):
    def fn(x, ws, s):
        return vitkernels.window_partition(x, ws, s, backend=backend)

    probe = torch.zeros(1, 7, 7, 1, device=DEVICE, dtype=DTYPE)
    try:
        fn(probe, 7, 3)
    except vitkernels.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip(TRITON_ON_CPU)
    return fn


@pytest.mark.parametrize("peer,make", list(_peers()), ids=[p for p, _ in _peers()])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_window_partition(benchmark, shape, peer, make):
    name, B, H, W, C, ws, s = shape
    benchmark.group = f"window_partition | {name}"
    benchmark.extra_info["peer"] = peer
    fn = make()
    x = torch.randn(B, H, W, C, device=DEVICE, dtype=DTYPE)
    assert_agrees(benchmark, fn(x, ws, s), reference.window_partition(x, (ws, ws), (s, s)), atol=0, rtol=0)
    out_bytes = B * (-(-H // ws) * ws) * (-(-W // ws) * ws) * C * x.element_size()
    run_benchmark(benchmark, lambda: fn(x, ws, s), peer=peer, bytes_moved=x.numel() * x.element_size() + out_bytes)
