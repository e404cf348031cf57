"""MSN loss, one training step (forward + backward w.r.t. anchors and prototypes): the official-style eager loss vs
torch.compile of it vs the fused vitkernels backends.

Issue-sized: 1,024 prototypes of dimension 256, 11 anchor views (1 random + 10 focal) of B = 64 images per GPU
(anchors (704, 256), targets (64, 256)); B = 16 on CPU. Peers (facebookresearch/msn ``src/losses.py``
``init_msn_loss``, single process):

* ``official eager``: the official arithmetic with the prototype labels the training script passes
  (``one_hot(range(K))``, no label smoothing: the identity) taken as what they are, so ``softmax(...) @ labels`` is
  ``softmax(...)``: every other peer skips that (K, K) matmul too. This is the baseline.
* ``official eager (as released)``: the released code as the training script calls it: the matmul by the (K, K)
  one-hot label matrix, and the statistics the loss computes for its log on every call (number of distinct target
  argmaxes: a device-to-host copy; max / min target means).
* ``official torch.compile``: ``official eager`` compiled.
* ``reference eager``: vitkernels' reference (log_softmax formulation), and the vitkernels backends.

Two settings: the code defaults (me-max on, Sinkhorn and entropy off) and the released ViT-S/16 config (Sinkhorn
on, entropy computed with weight 0). Every peer's loss and gradients (anchors, prototypes) are checked against the
official arithmetic in float64 before timing. On CUDA ``extra_info["peak_memory_mib"]`` is the peak memory the step
allocates above its inputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.reference import msn_loss as reference

from conftest import DEVICE, TRITON_ON_CPU, assert_agrees, compiled_or_skip, peak_memory_mib, run_benchmark

K, D, VIEWS = 1024, 256, 11
B = 64 if DEVICE.type == "cuda" else 16
CONFIGS = {
    "defaults": dict(),
    "vits16 config": dict(use_sinkhorn=True, use_entropy=True, ent_weight=0.0),
}


def _official_style(num_views, tau=0.1, T=0.25, me_max=True, use_entropy=False, use_sinkhorn=False,
                    me_max_weight=1.0, ent_weight=0.0, released=False):
    """The official MSN loss's arithmetic (same ops, same order) and the training script's weighting, single process.

    ``released=False``: the identity prototype labels are not multiplied (``softmax(...) @ I`` is ``softmax(...)``);
    ``released=True``: ``softmax(...) @ labels`` as released, plus the loss's per-call log statistics."""

    def snn(query, prototypes, labels):
        probs = torch.softmax(F.normalize(query) @ F.normalize(prototypes).T / tau, dim=1)
        return probs @ labels if released else probs

    def sinkhorn(Q, num_itr=3):  # distributed_sinkhorn with world size 1: in place on the transposed view
        Q = Q.T
        B_, K_ = Q.shape[1], Q.shape[0]
        Q /= torch.sum(Q)
        for _ in range(num_itr):
            Q /= torch.sum(Q, dim=1, keepdim=True)
            Q /= K_
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B_
        Q *= B_
        return Q.T

    def loss(anchors, targets, prototypes, labels):
        probs = snn(anchors, prototypes, labels)
        with torch.no_grad():
            sharp = snn(targets, prototypes, labels) ** (1.0 / T)
            sharp /= torch.sum(sharp, dim=1, keepdim=True)
            if use_sinkhorn:
                sharp = sinkhorn(sharp)
            t = torch.cat([sharp for _ in range(num_views)], dim=0)
        ce = torch.mean(torch.sum(torch.log(probs ** (-t)), dim=1))
        total = ce
        if me_max:
            avg = torch.mean(probs, dim=0)
            total = total + me_max_weight * (-torch.sum(torch.log(avg ** (-avg))) + math.log(float(len(avg))))
        if use_entropy:
            total = total + ent_weight * torch.mean(torch.sum(torch.log(probs ** (-probs)), dim=1))
        if released:
            with torch.no_grad():  # the released loss's log statistics, computed on every call
                float(len(set(t.argmax(dim=1).tolist())))
                t.max(dim=1).values.mean()
                t.min(dim=1).values.mean()
        return total

    return loss


def _peers():
    yield "official eager", lambda cfg: (_official_style(VIEWS, **cfg), False)
    yield "official eager (as released)", lambda cfg: (_official_style(VIEWS, released=True, **cfg), True)
    yield "official torch.compile", lambda cfg: (compiled_or_skip(_official_style(VIEWS, **cfg), dynamic=False), False)
    yield "reference eager", lambda cfg: (reference.MSNLoss(num_views=VIEWS, **cfg), False)
    for backend in ("triton", "native"):
        yield f"vitkernels {backend}", (lambda b: lambda cfg: (_backend_or_skip(b, cfg), False))(backend)


def _backend_or_skip(backend, cfg):
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip(TRITON_ON_CPU)
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
    benchmark.extra_info["peer"] = peer
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

    got = (step(), anchors.grad, prototypes.grad)
    a64, p64 = (t.detach().double().requires_grad_() for t in (anchors, prototypes))
    value = _official_style(VIEWS, **CONFIGS[config])(a64, targets.double(), p64, None)
    value.backward()
    assert_agrees(benchmark, got, (value, a64.grad, p64.grad), atol=1e-4, rtol=1e-3)

    # read anchors, targets, prototypes; write their gradients
    bytes_moved = (2 * anchors.numel() + targets.numel() + 2 * prototypes.numel()) * anchors.element_size()
    flops = 2 * (VIEWS + 1) * B * K * D + 2 * 2 * VIEWS * B * K * D  # logits GEMM + the two gradient GEMMs
    run_benchmark(benchmark, step, peer=peer, bytes_moved=bytes_moved, flops=flops)
    if DEVICE.type == "cuda":
        anchors.grad = prototypes.grad = None  # gradients are allocated inside the measured step, for every peer
        benchmark.extra_info["peak_memory_mib"] = peak_memory_mib(step)
