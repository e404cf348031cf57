"""MAE random masking, decoder unshuffle and MSN patch drop vs the official-style eager code (argsort + gather with
a repeated index + cat + separate pos-embed add) and torch.compile of it.

Shapes: ViT-L/16 MAE at 224 (B=256, L=196, encoder D=1024, decoder D=512, mask ratio 0.75) in bf16 on a GPU;
B=16 in fp32 on CPU. ``bytes`` in extra_info is the bandwidth floor: every input element that the result depends on
read once, every output element written once (for a broadcast table, the table once). Every peer's outputs (and
input gradients for fwd+bwd) are checked against the official code's arithmetic in float64 before timing.
vitkernels' argument checks (shapes, dtypes; on CPU the check that a passed permutation is one) run inside its timed
calls, as a user pays them.
The whole MAE-side path (masking + unshuffle + loss, forward and backward) is in ``bench_mae_loss.py``.
"""
import math

import pytest
import torch

import vitkernels

from conftest import DEVICE, TRITON_ON_CPU, assert_agrees, compiled_or_skip, run_benchmark

BATCH = 256 if DEVICE.type == "cuda" else 16
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
L, D_ENC, D_DEC, RATIO = 196, 1024, 512, 0.75
KEEP = int(L * (1 - RATIO))
SHAPE = f"vit-l/16 B{BATCH} L{L} D{D_ENC}/{D_DEC} r{RATIO} {str(DTYPE).replace('torch.', '')}"


# --- the official code's steps (facebookresearch/mae models_mae.py, facebookresearch/msn src/deit.py) ---------------

def official_masking(x, pos_embed, noise, mask_ratio):
    x = x + pos_embed
    N, L_, D = x.shape
    len_keep = int(L_ * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L_], device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def official_unshuffle(x, ids_restore, mask_token, pos_embed):
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


def official_patch_drop(x, perm, patch_drop):
    keep = int(math.floor((x.shape[1] - 1) * (1.0 - patch_drop)))
    idx = torch.cat([torch.zeros(1, dtype=perm.dtype, device=perm.device), 1 + perm[:keep]])
    return x[:, idx, :]


# --- peers ---------------------------------------------------------------------------------------------------------

def vitkernels_masking(backend):
    return lambda x, pos_embed, noise, mask_ratio: vitkernels.random_masking(x, mask_ratio, noise, pos_embed,
                                                                               backend=backend)


def vitkernels_unshuffle(backend):
    return lambda x, ids_restore, mask_token, pos_embed: vitkernels.mae_unshuffle(x, ids_restore, mask_token,
                                                                                  pos_embed, backend=backend)


def vitkernels_patch_drop(backend):
    return lambda x, perm, patch_drop: vitkernels.msn_patch_drop(x, patch_drop, perm, backend=backend)[0]


def backend_or_skip(op, backend, call):
    """Skip with the dispatcher's reason when ``backend`` cannot serve ``call`` here."""
    reason = op.reasons(call)[backend]
    if reason is not None:
        pytest.skip(f"vitkernels {backend}: {reason}")
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip(TRITON_ON_CPU)


PEERS = ["official eager", "official torch.compile", "vitkernels native", "vitkernels triton"]


def make_peer(peer, official, ours, op, call):
    if peer == "official eager":
        return official
    if peer == "official torch.compile":
        return compiled_or_skip(official, dynamic=False)
    backend = peer.split()[-1]
    backend_or_skip(op, backend, call)
    return ours(backend)


def _call(dtype=DTYPE, **details):
    return vitkernels.dispatch.Call(DEVICE, dtype, details)


def check_against_official(benchmark, fn, official, args, grad):
    """Assert ``fn(*args)`` agrees with ``official`` run in float64 on the same inputs (forward outputs; with
    ``grad``, also the gradients of the inputs that require one, from ``grad`` on the first output)."""
    def run(f, inputs):
        out = f(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        if grad is None:
            return out
        leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(out[0], leaves, grad.to(out[0].dtype))
        return out + tuple(grads)

    def to64(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().double().requires_grad_(a.requires_grad)
        return a

    got = run(fn, args)
    expected = run(official, tuple(to64(a) for a in args))
    assert_agrees(benchmark, got, expected)


# --- benchmarks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("peer", PEERS)
def test_random_masking(benchmark, peer, backward):
    benchmark.group = f"random_masking {'fwd+bwd' if backward else 'fwd'} | {SHAPE}"
    benchmark.extra_info["peer"] = peer
    fn = make_peer(peer, official_masking, vitkernels_masking, vitkernels.ops.masking.random_masking_op,
                   _call(num_tokens=L))
    x = torch.randn(BATCH, L, D_ENC, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    pos = torch.randn(1, L, D_ENC, device=DEVICE, dtype=DTYPE)
    noise = torch.rand(BATCH, L, device=DEVICE)
    grad = torch.randn(BATCH, KEEP, D_ENC, device=DEVICE, dtype=DTYPE)
    check_against_official(benchmark, fn, official_masking, (x, pos, noise, RATIO), grad if backward else None)
    es = x.element_size()
    # kept rows read and written, the table's kept rows, noise read, mask and ids_restore written
    moved = BATCH * KEEP * D_ENC * es * 2 + KEEP * D_ENC * es + BATCH * L * (4 + es + 8)
    if backward:
        moved += BATCH * KEEP * D_ENC * es + BATCH * L * D_ENC * es  # read grad, write grad_x

        def run():
            out = fn(x, pos, noise, RATIO)[0]
            torch.autograd.backward(out, grad)
    else:
        def run():
            return fn(x, pos, noise, RATIO)

    run_benchmark(benchmark, run, peer=peer, bytes_moved=moved)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("peer", PEERS)
def test_mae_unshuffle(benchmark, peer, backward):
    benchmark.group = f"mae_unshuffle {'fwd+bwd' if backward else 'fwd'} | {SHAPE}"
    benchmark.extra_info["peer"] = peer
    fn = make_peer(peer, official_unshuffle, vitkernels_unshuffle, vitkernels.ops.masking.mae_unshuffle_op, _call())
    x = torch.randn(BATCH, 1 + KEEP, D_DEC, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    token = torch.randn(1, 1, D_DEC, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    pos = torch.randn(1, 1 + L, D_DEC, device=DEVICE, dtype=DTYPE)
    ids_restore = torch.argsort(torch.rand(BATCH, L, device=DEVICE), dim=1)
    grad = torch.randn(BATCH, 1 + L, D_DEC, device=DEVICE, dtype=DTYPE)
    check_against_official(benchmark, fn, official_unshuffle, (x, ids_restore, token, pos), grad if backward else None)
    es = x.element_size()
    moved = x.numel() * es + pos.numel() * es + ids_restore.numel() * 8 + BATCH * (1 + L) * D_DEC * es
    if backward:
        moved += grad.numel() * es + ids_restore.numel() * 8 + x.numel() * es  # read grad + ids, write grad_x

        def run():
            torch.autograd.backward(fn(x, ids_restore, token, pos), grad)
    else:
        def run():
            return fn(x, ids_restore, token, pos)

    run_benchmark(benchmark, run, peer=peer, bytes_moved=moved)


@pytest.mark.parametrize("peer", PEERS)
def test_msn_patch_drop(benchmark, peer):
    drop = 0.3
    keep = int(L * (1 - drop))
    benchmark.group = f"msn_patch_drop fwd | B{BATCH} L{L} D{D_ENC} drop 0.3 {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info["peer"] = peer
    fn = make_peer(peer, official_patch_drop, vitkernels_patch_drop, vitkernels.ops.masking.msn_patch_drop_op, _call())
    x = torch.randn(BATCH, 1 + L, D_ENC, device=DEVICE, dtype=DTYPE)
    perm = torch.randperm(L, device=DEVICE)
    check_against_official(benchmark, fn, official_patch_drop, (x, perm, drop), None)
    moved = 2 * BATCH * (1 + keep) * D_ENC * x.element_size()
    run_benchmark(benchmark, lambda: fn(x, perm, drop), peer=peer, bytes_moved=moved)
