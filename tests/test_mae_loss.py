"""MAE masked reconstruction loss.

The reference (:mod:`vitkernels.reference.mae_loss`) is checked against a loop over patches (explicit slicing, sums
and the unbiased variance written out) and an ``F.unfold`` formulation; backends against the reference.
"""
import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.reference import mae_loss as reference

from helpers import DEVICES

RATIOS = [0.0, 0.5, 0.75, 0.9]


def loop_mae_loss(imgs, pred, mask, p, norm_pix):
    """Per patch: slice the pixels, order them (row, column, channel), normalise, squared error, weighted mean."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    num = torch.zeros((), dtype=torch.float64)
    for n in range(N):
        for i in range(h):
            for j in range(w):
                patch = imgs[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1).double()
                if norm_pix:
                    P = patch.numel()
                    mean = patch.sum() / P
                    var = ((patch - mean) ** 2).sum() / (P - 1)
                    patch = (patch - mean) / torch.sqrt(var + 1e-6)
                err = ((pred[n, i * w + j].double() - patch) ** 2).sum() / patch.numel()
                num = num + err * mask[n, i * w + j].double()
    return num / mask.double().sum()


def unfold_targets(imgs, p, norm_pix):
    """Patch targets through F.unfold ((c, row, col) order) permuted to the MAE (row, col, c) order."""
    N, C, H, W = imgs.shape
    cols = F.unfold(imgs, kernel_size=p, stride=p)  # (N, C*p*p, L)
    t = cols.transpose(1, 2).reshape(N, -1, C, p * p).transpose(2, 3).reshape(N, -1, p * p * C)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    return t


def _inputs(N, C, H, W, p, ratio, dtype=torch.float64, device="cpu"):
    imgs = torch.randn(N, C, H, W, dtype=dtype, device=device)
    L = (H // p) * (W // p)
    pred = torch.randn(N, L, p * p * C, dtype=dtype, device=device)
    _, mask, _ = vitkernels.reference.masking.random_masking(torch.empty(N, L, 1, dtype=dtype), ratio)
    return imgs, pred, mask.to(device=device, dtype=dtype)


SHAPES = [(2, 3, 8, 8, 4), (1, 2, 6, 9, 3), (3, 1, 10, 10, 2), (2, 3, 14, 7, 7), (1, 3, 32, 48, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_reference_matches_loop(shape, ratio, norm_pix):
    N, C, H, W, p = shape
    imgs, pred, mask = _inputs(N, C, H, W, p, ratio)
    got = reference.mae_loss(imgs, pred, mask, p, norm_pix)
    torch.testing.assert_close(got, loop_mae_loss(imgs, pred, mask, p, norm_pix))
    torch.testing.assert_close(reference.patch_targets(imgs, p, norm_pix), unfold_targets(imgs, p, norm_pix))


def test_reference_soft_weights_and_zero_mask():
    imgs, pred, _ = _inputs(2, 3, 8, 8, 4, 0.5)
    weights = torch.rand(2, 4, dtype=torch.float64)
    torch.testing.assert_close(
        reference.mae_loss(imgs, pred, weights, 4, True), loop_mae_loss(imgs, pred, weights, 4, True)
    )
    # mask ratio 0: nothing removed, 0 / 0 as the official code
    assert torch.isnan(reference.mae_loss(imgs, pred, torch.zeros(2, 4, dtype=torch.float64), 4))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reference_gradients(norm_pix):
    imgs, pred, mask = _inputs(2, 2, 6, 4, 2, 0.5)
    imgs.requires_grad_()
    pred.requires_grad_()
    mask = mask.clone().requires_grad_()
    torch.autograd.gradcheck(lambda a, b, m: reference.mae_loss(a, b, m, 2, norm_pix), (imgs, pred, mask))


# --- public op: backends vs reference ------------------------------------------------------------------------------

def backends_for(device):
    out = ["reference"]
    call = vitkernels.dispatch.Call(torch.device(device), torch.float32, {"grad_imgs": False, "grad_mask": False})
    for name in ("native", "triton"):
        if vitkernels.ops.mae_loss.mae_loss_op.reasons(call)[name] is None:
            out.append(name)
    return out


CASES = [(d, b) for d in DEVICES for b in backends_for(d)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # ratio 0: 0 / 0 on purpose
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_backend_forward_backward(device, backend, shape, ratio, norm_pix):
    N, C, H, W, p = shape
    imgs, pred, mask = _inputs(N, C, H, W, p, ratio, device=device)
    pred.requires_grad_()
    loss = vitkernels.mae_loss(imgs, pred, mask, p, norm_pix, backend=backend)
    pred_ref = pred.detach().cpu().requires_grad_()
    want = reference.mae_loss(imgs.cpu(), pred_ref, mask.cpu(), p, norm_pix)
    assert loss.dtype == want.dtype and loss.shape == ()
    torch.testing.assert_close(loss.cpu(), want, equal_nan=True)
    (grad,) = torch.autograd.grad(loss, pred)
    (grad_ref,) = torch.autograd.grad(want, pred_ref)
    torch.testing.assert_close(grad.cpu(), grad_ref, equal_nan=True)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize(
    "imgs_dtype,pred_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float16),
     (torch.bfloat16, torch.bfloat16)],
)
def test_backend_dtypes(device, backend, imgs_dtype, pred_dtype):
    imgs, pred, mask = _inputs(2, 3, 8, 8, 4, 0.75, dtype=torch.float32, device=device)
    imgs, pred, mask = imgs.to(imgs_dtype), pred.to(pred_dtype).requires_grad_(), mask.to(pred_dtype)
    loss = vitkernels.mae_loss(imgs, pred, mask, 4, True, backend=backend)
    assert loss.dtype == torch.promote_types(imgs_dtype, pred_dtype)
    pred_ref = pred.detach().cpu().float().requires_grad_()
    want = reference.mae_loss(imgs.cpu().float(), pred_ref, mask.cpu().float(), 4, True)
    tol = dict(rtol=2e-2, atol=2e-2) if loss.dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.cpu().float(), want, **tol)
    (grad,) = torch.autograd.grad(loss, pred)
    (grad_ref,) = torch.autograd.grad(want, pred_ref)
    assert grad.dtype == pred_dtype
    gtol = dict(rtol=2e-2, atol=1e-3) if pred_dtype != torch.float32 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.cpu().float(), grad_ref, **gtol)


# --- bad inputs ----------------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    imgs, pred, mask = _inputs(2, 3, 8, 8, 4, 0.75, dtype=torch.float32)
    with pytest.raises(ValueError, match="patch_size"):
        vitkernels.mae_loss(imgs, pred, mask, 3)
    with pytest.raises(ValueError, match="patch_size"):
        vitkernels.mae_loss(imgs, pred, mask, 0)
    with pytest.raises(TypeError, match="patch_size"):
        vitkernels.mae_loss(imgs, pred, mask, 4.0)
    with pytest.raises(ValueError, match="pred"):
        vitkernels.mae_loss(imgs, pred[:, :3], mask, 4)
    with pytest.raises(ValueError, match="pred"):
        vitkernels.mae_loss(imgs, pred[..., :47], mask, 4)
    with pytest.raises(ValueError, match="mask"):
        vitkernels.mae_loss(imgs, pred, mask[:, :3], 4)
    with pytest.raises(TypeError, match="mask"):
        vitkernels.mae_loss(imgs, pred, mask.bool(), 4)
    with pytest.raises(ValueError, match="imgs must have 4"):
        vitkernels.mae_loss(imgs[0], pred, mask, 4)
    with pytest.raises(TypeError, match="norm_pix_loss"):
        vitkernels.mae_loss(imgs, pred, mask, 4, norm_pix_loss=1)
    with pytest.raises(ValueError, match="norm_pix_loss"):
        vitkernels.mae_loss(torch.randn(1, 1, 2, 2), torch.randn(1, 4, 1), torch.ones(1, 4), 1, True)
    with pytest.raises(ValueError, match="mask is on meta"):
        vitkernels.mae_loss(imgs, pred, mask.to("meta"), 4)


@pytest.mark.parametrize("device,backend", CASES)
def test_backend_soft_weights_and_offset_pixels(device, backend):
    """Non-binary weights, and pixels far from 0 (the variance must not cancel catastrophically in fp32)."""
    imgs, pred, _ = _inputs(2, 3, 8, 8, 4, 0.5, dtype=torch.float32, device=device)
    imgs = imgs * 0.1 + 100.0
    weights = torch.rand(2, 4, device=device)
    loss = vitkernels.mae_loss(imgs, pred, weights, 4, True, backend=backend)
    want = reference.mae_loss(imgs.cpu().double(), pred.cpu().double(), weights.cpu().double(), 4, True)
    torch.testing.assert_close(loss.cpu().double(), want, rtol=1e-4, atol=1e-5)


# --- Triton custom ops ---------------------------------------------------------------------------------------------

TRITON_DEVICES = [d for d, b in CASES if b == "triton"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_opcheck(device):
    ops = torch.ops.vitkernels
    imgs, pred, mask = _inputs(2, 3, 4, 6, 2, 0.5, dtype=torch.float32, device=device)
    pred.requires_grad_()
    for norm_pix in (False, True):
        torch.library.opcheck(ops.triton_mae_loss, (imgs, pred, mask, 2, norm_pix))
    torch.library.opcheck(ops.triton_mae_loss, (imgs, pred.detach().bfloat16(), mask.bfloat16(), 2, True))
    grad = torch.tensor(1.5, device=device)
    torch.library.opcheck(ops.triton_mae_loss_backward, (grad, imgs, pred.detach(), mask, 2, True))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_gradcheck_pred(device):
    imgs, pred, mask = _inputs(2, 2, 4, 6, 2, 0.5, device=device)
    pred.requires_grad_()
    for norm_pix in (False, True):
        torch.autograd.gradcheck(
            lambda b: vitkernels.mae_loss(imgs, b, mask, 2, norm_pix, backend="triton"), (pred,), fast_mode=True
        )


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_refuses_grads_it_does_not_compute(device):
    """The Triton loss differentiates w.r.t. pred only: a call needing d/dimgs or d/dmask must not silently drop it."""
    imgs, pred, mask = _inputs(1, 3, 4, 4, 2, 0.5, dtype=torch.float32, device=device)
    op = vitkernels.ops.mae_loss.mae_loss_op
    for details in ({"grad_imgs": True}, {"grad_mask": True}):
        assert "pred only" in op.reasons(vitkernels.dispatch.Call(torch.device(device), torch.float32, details))["triton"]
    with pytest.raises(vitkernels.BackendUnavailableError, match="pred only"):
        vitkernels.mae_loss(imgs.requires_grad_(), pred, mask, 2, backend="triton")
    with pytest.raises(vitkernels.BackendUnavailableError, match="pred only"):
        vitkernels.mae_loss(imgs.detach(), pred, mask.clone().requires_grad_(), 2, backend="triton")
    # auto serves it (the reference on CPU; on CUDA too, since triton declines), with the gradient w.r.t. imgs
    loss = vitkernels.mae_loss(imgs, pred, mask, 2)
    (g,) = torch.autograd.grad(loss, imgs)
    want = torch.autograd.grad(reference.mae_loss(imgs, pred, mask, 2), imgs)[0]
    torch.testing.assert_close(g, want)


@pytest.mark.cuda
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16])
def test_cuda_vit_large_shapes(norm_pix, pred_dtype):
    N, p = 32, 16
    imgs = torch.randn(N, 3, 224, 224, device="cuda")
    pred = torch.randn(N, 196, 768, device="cuda", dtype=pred_dtype, requires_grad=True)
    _, mask, _ = vitkernels.random_masking(torch.empty(N, 196, 1, device="cuda"), 0.75)
    loss = vitkernels.mae_loss(imgs, pred, mask, p, norm_pix, backend="triton")
    pred_ref = pred.detach().double().requires_grad_()
    want = reference.mae_loss(imgs.double(), pred_ref, mask.double(), p, norm_pix)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, pred)
    (w,) = torch.autograd.grad(want, pred_ref)
    tol = dict(rtol=1e-4, atol=1e-9) if pred_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-7)
    torch.testing.assert_close(g.double(), w, **tol)
