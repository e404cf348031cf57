"""DINO loss, one training step (forward + backward + centre update): the official-style eager module vs
torch.compile of it vs the fused vitkernels backends.

Issue-sized on a GPU: K = 65,536 prototypes, B = 64 images per GPU, 2 global + 8 local crops (student (640, 65536),
teacher (128, 65536)); scaled down on CPU. On CUDA ``extra_info["peak_memory_mib"]`` is the peak memory the step
allocates above its inputs (``torch.cuda.max_memory_allocated``).
"""
import pytest
import torch

import vitkernels
from vitkernels.reference import dino_loss as reference

from conftest import DEVICE, compiled_or_skip, peak_memory_mib, run_benchmark

NCROPS = 10
# (name, B, K, dtype)
if DEVICE.type == "cuda":
    SHAPES = [
        ("K65536 B64 2+8 crops fp32", 64, 65536, torch.float32),
        ("K65536 B64 2+8 crops bf16", 64, 65536, torch.bfloat16),
    ]
else:
    SHAPES = [("K4096 B8 2+8 crops fp32", 8, 4096, torch.float32)]


def _module(cls, K):
    return cls(K, NCROPS, 0.04, 0.07, 30, 100).to(DEVICE)


def _peers():
    yield "official eager", lambda K: _module(reference.DINOLoss, K)
    yield "official torch.compile", lambda K: compiled_or_skip(_module(reference.DINOLoss, K), dynamic=False)
    for backend in ("triton", "native"):
        yield f"vitkernels {backend}", (lambda b: lambda K: _backend_or_skip(b, K))(backend)


def _backend_or_skip(backend, K):
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("triton on CPU is the interpreter, a correctness tool: not benchmarked")
    probe = torch.zeros(NCROPS, 8, device=DEVICE)
    try:
        vitkernels.dino_loss(probe, probe[:2], probe[0], NCROPS, backend=backend)
    except vitkernels.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    module = _module(vitkernels.DINOLoss, K)

    def step(student, teacher, epoch):
        # the module's ops read VITKERNELS_BACKEND; pin the backend through the ops instead
        temp = module.teacher_temp_schedule[epoch]
        loss = vitkernels.dino_loss(student, teacher, module.center, NCROPS, module.student_temp, temp,
                                    backend=backend)
        module.center.copy_(vitkernels.dino_center_update(module.center, teacher, module.center_momentum,
                                                          backend=backend))
        return loss

    return step


@pytest.mark.parametrize("peer,make", list(_peers()), ids=[p for p, _ in _peers()])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_dino_loss(benchmark, shape, peer, make):
    name, B, K, dtype = shape
    benchmark.group = f"dino_loss fwd+bwd | {name}"
    loss_fn = make(K)
    student = (3 * torch.randn(NCROPS * B, K, device=DEVICE)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(2 * B, K, device=DEVICE)).to(dtype)

    def step():
        student.grad = None
        loss = loss_fn(student, teacher, 40)
        loss.backward()
        return loss

    elt = student.element_size()
    # read student + teacher, write the student gradient: the floor of any implementation
    bytes_moved = (2 * student.numel() + teacher.numel()) * elt
    run_benchmark(benchmark, step, peer=peer, bytes_moved=bytes_moved)
    if DEVICE.type == "cuda":
        student.grad = None  # the gradient is allocated inside the measured step, for every peer alike
        benchmark.extra_info["peak_memory_mib"] = peak_memory_mib(step)
