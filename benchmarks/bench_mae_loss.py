"""MAE loss (patchify + norm-pix + per-patch MSE + masked mean), and the whole MAE-side data path (encoder masking +
decoder unshuffle + loss, forward and backward), vs the official-style eager code and torch.compile of it.

Shapes: ViT-L/16 MAE at 224 (B=256, 3x224x224 images in fp32, predictions (B, 196, 768) in bf16 as under autocast,
mask ratio 0.75) on a GPU; B=16 in fp32 on CPU. ``bytes`` is the bandwidth floor of a forward pass plus a separate
backward pass: the pixels and predictions of the removed patches read by each (kept patches carry no loss), the mask
read, the gradient written. Every peer's loss (and gradients) is checked against the official code's arithmetic in
float64 before timing.
"""
import pytest
import torch

import vitkernels

from bench_masking import (
    BATCH, D_DEC, D_ENC, DEVICE, DTYPE, KEEP, L, PEERS, RATIO, backend_or_skip, check_against_official,
    official_masking, official_unshuffle,
)
from conftest import assert_agrees, compiled_or_skip, run_benchmark

P, PATCH = 768, 16
IMG_DTYPE = torch.float32
SHAPE = f"vit-l/16 B{BATCH} 3x224x224 r{RATIO} pred {str(DTYPE).replace('torch.', '')}"


def official_loss(imgs, pred, mask, norm_pix_loss=True):
    """facebookresearch/mae forward_loss (patchify written for 3 channels and square images, as the official)."""
    p = PATCH
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    target = x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def vitkernels_loss(backend):
    return lambda imgs, pred, mask, norm_pix_loss=True: vitkernels.mae_loss(imgs, pred, mask, PATCH, norm_pix_loss,
                                                                            backend=backend)


def _inputs(grad=True):
    imgs = torch.randn(BATCH, 3, 224, 224, device=DEVICE, dtype=IMG_DTYPE)
    pred = torch.randn(BATCH, L, P, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    ids = torch.argsort(torch.rand(BATCH, L, device=DEVICE), dim=1)
    mask = (ids >= KEEP).to(DTYPE)
    return imgs, pred, mask


def _loss_bytes(pred, mask, backward):
    removed = BATCH * (L - KEEP) * P
    fwd = removed * (IMG_DTYPE.itemsize + pred.element_size()) + mask.numel() * mask.element_size()
    if not backward:
        return fwd
    return 2 * fwd + pred.numel() * pred.element_size()


def _call():
    return vitkernels.dispatch.Call(DEVICE, DTYPE, {"grad_imgs": False, "grad_mask": False, "patch_numel": P})


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("peer", PEERS)
def test_mae_loss(benchmark, peer, backward):
    benchmark.group = f"mae_loss norm_pix {'fwd+bwd' if backward else 'fwd'} | {SHAPE}"
    benchmark.extra_info["peer"] = peer
    if peer == "official eager":
        fn = official_loss
    elif peer == "official torch.compile":
        fn = compiled_or_skip(official_loss, dynamic=False)
    else:
        backend = peer.split()[-1]
        backend_or_skip(vitkernels.ops.mae_loss.mae_loss_op, backend, _call())
        fn = vitkernels_loss(backend)
    imgs, pred, mask = _inputs(backward)
    check_against_official(benchmark, fn, official_loss, (imgs, pred, mask),
                           torch.ones((), device=DEVICE) if backward else None)
    if backward:
        def run():
            fn(imgs, pred, mask).backward()
    else:
        def run():
            return fn(imgs, pred, mask)

    run_benchmark(benchmark, run, peer=peer, bytes_moved=_loss_bytes(pred, mask, backward))


def _pipeline(masking, unshuffle, loss):
    """Forward of the MAE-side data path: encoder masking (+pos), decoder unshuffle (+pos), loss."""

    def forward(x, pos, noise, y, token, dpos, imgs, pred):
        x_masked, mask, ids_restore = masking(x, pos, noise, RATIO)
        dec = unshuffle(y, ids_restore, token, dpos)
        return x_masked, dec, loss(imgs, pred, mask)

    return forward


@pytest.mark.parametrize("peer", PEERS)
def test_mae_path(benchmark, peer):
    """The issue's target: gather + unshuffle + loss, forward and backward, >= 2x the official eager code on a GPU."""
    benchmark.group = f"mae masking+unshuffle+loss fwd+bwd | {SHAPE}"
    benchmark.extra_info["peer"] = peer
    if peer == "official eager":
        forward = _pipeline(official_masking, official_unshuffle, official_loss)
    elif peer == "official torch.compile":
        forward = compiled_or_skip(_pipeline(official_masking, official_unshuffle, official_loss), dynamic=False)
    else:
        backend = peer.split()[-1]
        backend_or_skip(vitkernels.ops.masking.random_masking_op, backend,
                        vitkernels.dispatch.Call(DEVICE, DTYPE, {"num_tokens": L}))
        backend_or_skip(vitkernels.ops.mae_loss.mae_loss_op, backend, _call())
        forward = _pipeline(
            lambda x, pos, noise, r: vitkernels.random_masking(x, r, noise, pos, backend=backend),
            lambda y, ids, token, dpos: vitkernels.mae_unshuffle(y, ids, token, dpos, backend=backend),
            vitkernels_loss(backend),
        )
    kw = dict(device=DEVICE, dtype=DTYPE)
    x = torch.randn(BATCH, L, D_ENC, **kw, requires_grad=True)
    pos = torch.randn(1, L, D_ENC, **kw)
    noise = torch.rand(BATCH, L, device=DEVICE)
    y = torch.randn(BATCH, 1 + KEEP, D_DEC, **kw, requires_grad=True)
    token = torch.randn(1, 1, D_DEC, **kw, requires_grad=True)
    dpos = torch.randn(1, 1 + L, D_DEC, **kw)
    imgs, pred, mask = _inputs(True)
    gx = torch.randn(BATCH, KEEP, D_ENC, **kw)
    gy = torch.randn(BATCH, 1 + L, D_DEC, **kw)
    es = x.element_size()
    # masking: forward reads and writes the kept rows; backward reads their gradient and writes grad_x
    masking_bytes = BATCH * KEEP * D_ENC * es * 3 + BATCH * L * D_ENC * es
    unshuffle_bytes = 2 * (y.numel() + gy.numel()) * es  # fwd read x, write out; bwd read g, write grad_x
    moved = masking_bytes + unshuffle_bytes + _loss_bytes(pred, mask, True)

    def outputs_and_grads(f, inputs):
        x_masked, dec, value = f(*inputs)
        leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad([x_masked, dec, value], leaves,
                                    [gx.to(x_masked.dtype), gy.to(dec.dtype), None])
        return (x_masked, dec, value) + tuple(grads)

    inputs = (x, pos, noise, y, token, dpos, imgs, pred)
    inputs64 = tuple(a.detach().double().requires_grad_(a.requires_grad) for a in inputs)
    official64 = _pipeline(official_masking, official_unshuffle, official_loss)
    assert_agrees(benchmark, outputs_and_grads(forward, inputs), outputs_and_grads(official64, inputs64))

    def step():
        x_masked, dec, value = forward(x, pos, noise, y, token, dpos, imgs, pred)
        torch.autograd.backward([x_masked, dec, value], [gx, gy, None])  # backward through all three

    run_benchmark(benchmark, step, peer=peer, bytes_moved=moved)
