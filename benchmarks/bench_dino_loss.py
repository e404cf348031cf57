"""DINO loss, one training step (forward + backward + centre update): the official code's eager arithmetic vs
torch.compile of it vs vitkernels' reference vs the fused vitkernels backends.

``official eager`` is facebookresearch/dino ``main_dino.py`` ``DINOLoss`` written out (:class:`OfficialDINOLoss`:
student chunks / temperature, centred and sharpened teacher softmax, log_softmax of each student view recomputed for
each teacher view, the centre EMA as an out-of-place update), single process (no all_reduce), not vitkernels' own
reference module, which is timed separately as ``reference eager``. Every peer's loss, student gradient and updated
centre are checked against the official arithmetic in float64 before timing.

Issue-sized on a GPU: K = 65,536 prototypes, B = 64 images per GPU, 2 global + 8 local crops (student (640, 65536),
teacher (128, 65536)); scaled down on CPU. On CUDA ``extra_info["peak_memory_mib"]`` is the peak memory the step
allocates above its inputs (``torch.cuda.max_memory_allocated``).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkernels
from vitkernels.reference import dino_loss as reference

from conftest import DEVICE, TRITON_ON_CPU, assert_agrees, compiled_or_skip, peak_memory_mib, run_benchmark

NCROPS = 10
# (name, B, K, dtype)
if DEVICE.type == "cuda":
    SHAPES = [
        ("K65536 B64 2+8 crops fp32", 64, 65536, torch.float32),
        ("K65536 B64 2+8 crops bf16", 64, 65536, torch.bfloat16),
    ]
else:
    SHAPES = [("K4096 B8 2+8 crops fp32", 8, 4096, torch.float32)]


class OfficialDINOLoss(nn.Module):
    """The official DINO loss's arithmetic, single process: the same ops in the same order as the released
    ``DINOLoss.forward`` / ``update_center`` (where world size 1 makes ``all_reduce`` the identity)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        student_views = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_views = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, terms = 0, 0
        for t, q in enumerate(teacher_views):
            for v, s in enumerate(student_views):
                if v == t:
                    continue  # the same view seen by teacher and student is not a pair
                total += torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        total /= terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def _module(cls, K):
    return cls(K, NCROPS, 0.04, 0.07, 30, 100).to(DEVICE)


def _centre(loss_fn):
    """The centre buffer of a peer (a module, a compiled module, or a vitkernels step closure)."""
    module = getattr(loss_fn, "_orig_mod", None) or getattr(loss_fn, "module", None) or loss_fn
    return module.center


def _peers():
    yield "official eager", lambda K: _module(OfficialDINOLoss, K)
    yield "official torch.compile", lambda K: compiled_or_skip(_module(OfficialDINOLoss, K), dynamic=False)
    yield "reference eager", lambda K: _module(reference.DINOLoss, K)
    for backend in ("triton", "native"):
        yield f"vitkernels {backend}", (lambda b: lambda K: _backend_or_skip(b, K))(backend)


def _backend_or_skip(backend, K):
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip(TRITON_ON_CPU)
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

    step.module = module
    return step


@pytest.mark.parametrize("peer,make", list(_peers()), ids=[p for p, _ in _peers()])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_dino_loss(benchmark, shape, peer, make):
    name, B, K, dtype = shape
    benchmark.group = f"dino_loss fwd+bwd | {name}"
    benchmark.extra_info["peer"] = peer
    loss_fn = make(K)
    student = (3 * torch.randn(NCROPS * B, K, device=DEVICE)).to(dtype).requires_grad_(True)
    teacher = (3 * torch.randn(2 * B, K, device=DEVICE)).to(dtype)

    def step():
        student.grad = None
        loss = loss_fn(student, teacher, 40)
        loss.backward()
        return loss

    # agreement: one step of this peer vs one step of the official arithmetic in float64, from the same centre
    centre0 = torch.randn(1, K, device=DEVICE)
    _centre(loss_fn).copy_(centre0)
    got = (step(), student.grad, _centre(loss_fn))
    official = _module(OfficialDINOLoss, K).double()
    official.center = centre0.double()
    s64 = student.detach().double().requires_grad_()
    value = official(s64, teacher.double(), 40)
    value.backward()
    assert_agrees(benchmark, got, (value, s64.grad, official.center))

    elt = student.element_size()
    # read student + teacher, write the student gradient: the floor of any implementation
    bytes_moved = (2 * student.numel() + teacher.numel()) * elt
    run_benchmark(benchmark, step, peer=peer, bytes_moved=bytes_moved)
    if DEVICE.type == "cuda":
        student.grad = None  # the gradient is allocated inside the measured step, for every peer alike
        benchmark.extra_info["peak_memory_mib"] = peak_memory_mib(step)
