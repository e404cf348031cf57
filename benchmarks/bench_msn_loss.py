"""MSN loss, one training step (forward + backward w.r.t. anchors and prototypes): the official-style eager loss vs
torch.compile of it vs the fused vitkernels backends.

Issue-sized: 1,024 prototypes of dimension 256, 11 anchor views (1 random + 10 focal) of B = 64 images per GPU
(anchors (704, 256), targets (64, 256)); B = 16 on CPU. "official eager" passes the official one-hot prototype
labels (``one_hot(range(K))``, label smoothing 0 = the identity) as the official script does, to the official
arithmetic written out (softmax @ labels, ``log(probs ** -targets)``, its Sinkhorn); "reference eager" is vitkernels' reference with
``proto_labels=None`` (log_softmax, no label matmul). Two settings: the code defaults (me-max on, Sinkhorn and
entropy off) and the released ViT-S/16 config (Sinkhorn on, entropy computed with weight 0). On CUDA
``extra_info["peak_memory_mib"]`` is the peak memory the step allocates above its inputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.reference import msn_loss as reference

from conftest import DEVICE, compiled_or_skip, peak_memory_mib, run_benchmark

K, D, VIEWS = 1024, 256, 11
B = 64 if DEVICE.type == "cuda" else 16
CONFIGS = {
    "defaults": dict(),
    "vits16 config": dict(use_sinkhorn=True, use_entropy=True, ent_weight=0.0),
}


def _official_style(num_views, tau=0.1, T=0.25, me_max=True, use_entropy=False, use_sinkhorn=False,
                    me_max_weight=1.0, ent_weight=0.0):
    """The official MSN loss's arithmetic written out (src/losses.py ``init_msn_loss`` and the training script's
    weighting), single process: softmax of cosine logits @ one-hot labels, sharpening ``p ** (1/T)``, Sinkhorn as
    ``distributed_sinkhorn`` (3 row / column normalisations of Q^T), ``log(probs ** -targets)``, me-max."""

    def snn(query, prototypes, labels):
        logits = F.normalize(query) @ F.normalize(prototypes).T / tau
        return torch.softmax(logits, dim=1) @ labels

    def sinkhorn(Q, num_itr=3):
        Q = Q.T.clone()
        K_, B_ = Q.shape
        Q /= Q.sum()
        for _ in range(num_itr):
            Q /= Q.sum(dim=1, keepdim=True)
            Q /= K_
            Q /= Q.sum(dim=0, keepdim=True)
            Q /= B_
        return (Q * B_).T

    def loss(anchors, targets, prototypes, labels):
        probs = snn(anchors, prototypes, labels)
        with torch.no_grad():
            t = snn(targets, prototypes, labels) ** (1.0 / T)
            t = t / t.sum(dim=1, keepdim=True)
            if use_sinkhorn:
                t = sinkhorn(t)
            t = torch.cat([t for _ in range(num_views)], dim=0)
        ce = torch.mean(torch.sum(torch.log(probs ** (-t)), dim=1))
        total = ce
        if me_max:
            avg = torch.mean(probs, dim=0)
            total = total + me_max_weight * (-torch.sum(torch.log(avg ** (-avg))) + math.log(float(len(avg))))
        if use_entropy:
            total = total + ent_weight * torch.mean(torch.sum(torch.log(probs ** (-probs)), dim=1))
        return total

    return loss


def _peers():
    yield "official eager", lambda cfg: (_official_style(VIEWS, **cfg), True)
    yield "official torch.compile", lambda cfg: (compiled_or_skip(_official_style(VIEWS, **cfg), dynamic=False), True)
    yield "reference eager", lambda cfg: (reference.MSNLoss(num_views=VIEWS, **cfg), False)
    for backend in ("triton", "native"):
        yield f"vitkernels {backend}", (lambda b: lambda cfg: (_backend_or_skip(b, cfg), False))(backend)


def _backend_or_skip(backend, cfg):
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("triton on CPU is the interpreter, a correctness tool: not benchmarked")
    probe = torch.randn(2, 4, device=DEVICE)
    try:
        vitkernels.msn_loss(probe, probe, probe, backend=backend)
    except vitkernels.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    module = vitkernels.MSNLoss(num_views=VIEWS, **cfg)

    def loss(anchors, targets, prototypes, proto_labels=None):
        ce, rloss, sloss = vitkernels.msn_loss(
            anchors, targets, prototypes, proto_labels, module.num_views, module.tau, module.T, module.me_max,
            module.use_entropy, module.use_sinkhorn, backend=backend,
        )
        return ce + module.me_max_weight * rloss + module.ent_weight * sloss

    return loss


@pytest.mark.parametrize("peer,make", list(_peers()), ids=[p for p, _ in _peers()])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_msn_loss(benchmark, config, peer, make):
    benchmark.group = f"msn_loss fwd+bwd | K{K} D{D} {VIEWS} views B{B} {config}"
    loss_fn, one_hot_labels = make(CONFIGS[config])
    anchors = torch.randn(VIEWS * B, D, device=DEVICE, requires_grad=True)
    targets = torch.randn(B, D, device=DEVICE)
    prototypes = torch.empty(K, D, device=DEVICE).uniform_(-D ** -0.5, D ** -0.5).requires_grad_(True)
    labels = torch.eye(K, device=DEVICE) if one_hot_labels else None

    def step():
        anchors.grad = prototypes.grad = None
        loss = loss_fn(anchors, targets, prototypes, labels)
        loss.backward()
        return loss

    # read anchors, targets, prototypes; write their gradients
    bytes_moved = (2 * anchors.numel() + targets.numel() + 2 * prototypes.numel()) * anchors.element_size()
    flops = 2 * (VIEWS + 1) * B * K * D + 2 * 2 * VIEWS * B * K * D  # logits GEMM + the two gradient GEMMs
    run_benchmark(benchmark, step, peer=peer, bytes_moved=bytes_moved, flops=flops)
    if DEVICE.type == "cuda":
        anchors.grad = prototypes.grad = None  # gradients are allocated inside the measured step, for every peer
        benchmark.extra_info["peak_memory_mib"] = peak_memory_mib(step)
