"""MAE random masking, decoder unshuffle, MSN patch drop and patchify.

The reference (:mod:`vitkernels.reference.masking`) is checked against independent formulations written out here:
the official MAE / MSN code re-derived step by step, and per-element loop formulations (rank by counting,
one-hot gathers). Backends are checked against the reference.
"""
import pytest
import torch

import vitkernels
from vitkernels.reference import masking as reference

from helpers import DEVICES

RATIOS = [0.0, 0.5, 0.75, 0.9]
NUM_TOKENS = [7, 13, 49]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --- independent formulations --------------------------------------------------------------------------------------

def official_random_masking(x, mask_ratio, noise):
    """facebookresearch/mae ``random_masking``, written out (default argsort: fine for distinct noise)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def loop_random_masking(x, mask_ratio, noise, pos_embed=None):
    """Rank of every patch by counting (noise, index) pairs below it; kept tokens copied one by one."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    src = x if pos_embed is None else x + pos_embed.expand(N, L, D)
    x_masked = torch.empty(N, len_keep, D, dtype=x.dtype)
    mask = torch.empty(N, L)  # the default dtype, as the official torch.ones([N, L])
    ids_restore = torch.empty(N, L, dtype=torch.int64)

    def key(v, i):  # torch.sort order: NaN last, ties by index (stable)
        return (v != v, v if v == v else 0.0, i)

    for n in range(N):
        row = [float(v) for v in noise[n]]
        for l in range(L):
            rank = sum(1 for j in range(L) if key(row[j], j) < key(row[l], l))
            ids_restore[n, l] = rank
            mask[n, l] = float(rank >= len_keep)
            if rank < len_keep:
                x_masked[n, rank] = src[n, l]
    return x_masked, mask, ids_restore


def loop_unshuffle(x, ids_restore, mask_token, pos_embed=None):
    N, L = ids_restore.shape
    keep = x.shape[1] - 1
    D = x.shape[2]
    out = torch.empty(N, 1 + L, D, dtype=x.dtype)
    for n in range(N):
        out[n, 0] = x[n, 0]
        for l in range(L):
            r = int(ids_restore[n, l])
            out[n, 1 + l] = x[n, 1 + r] if r < keep else mask_token.reshape(D)
    if pos_embed is not None:
        out = out + pos_embed
    return out


def loop_patchify(imgs, p):
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    out = torch.empty(N, h * w, p * p * C, dtype=imgs.dtype)
    for i in range(h):
        for j in range(w):
            for pi in range(p):
                for qi in range(p):
                    for c in range(C):
                        out[:, i * w + j, (pi * p + qi) * C + c] = imgs[:, c, i * p + pi, j * p + qi]
    return out


def official_msn_patch_drop(x, patch_drop, perm):
    """facebookresearch/msn ``forward_features`` patch drop, with the permutation given."""
    import math

    T_H = int(math.floor((x.shape[1] - 1) * (1.0 - patch_drop)))
    perm = 1 + perm[:T_H]
    idx = torch.cat([torch.zeros(1, dtype=perm.dtype, device=perm.device), perm])
    return x[:, idx, :]


def _noise(N, L, kind="rand"):
    if kind == "rand":
        return torch.rand(N, L)
    if kind == "ties":  # few distinct values: many ties, broken by index
        return torch.randint(0, 3, (N, L)).float() / 3
    if kind == "nan":
        noise = torch.rand(N, L)
        noise[:, ::3] = float("nan")
        noise[:, 1] = 0.5
        noise[:, 2] = 0.5
        return noise
    raise ValueError(kind)


# --- reference vs independent formulations -------------------------------------------------------------------------

@pytest.mark.parametrize("L", NUM_TOKENS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_reference_random_masking_matches_official(L, ratio):
    x = torch.randn(3, L, 5)
    noise = torch.rand(3, L)
    got = reference.random_masking(x, ratio, noise)
    want = official_random_masking(x, ratio, noise)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["rand", "ties", "nan"])
@pytest.mark.parametrize("L", NUM_TOKENS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_reference_random_masking_matches_rank_by_counting(kind, L, ratio):
    x = torch.randn(2, L, 3, dtype=torch.float64)
    pos = torch.randn(1, L, 3, dtype=torch.float64)
    noise = _noise(2, L, kind)
    got = reference.random_masking(x, ratio, noise, pos)
    want = loop_random_masking(x, ratio, noise, pos)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_reference_random_masking_draws_official_noise():
    """Without noise, the same seed gives the official code's masks (noise = torch.rand(N, L, device))."""
    x = torch.randn(4, 13, 6)
    torch.manual_seed(123)
    got = reference.random_masking(x, 0.75)
    torch.manual_seed(123)
    want = official_random_masking(x, 0.75, torch.rand(4, 13, device=x.device))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("L,ratio,keep", [(196, 0.75, 49), (196, 0.9, 19), (49, 0.75, 12), (7, 0.9, 0), (13, 0.0, 13)])
def test_len_keep_is_official(L, ratio, keep):
    assert reference.num_kept(L, ratio) == keep
    x_masked, mask, _ = reference.random_masking(torch.randn(2, L, 3), ratio)
    assert x_masked.shape == (2, keep, 3)
    assert mask.sum().item() == 2 * (L - keep)


@pytest.mark.parametrize("L", NUM_TOKENS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_reference_unshuffle_matches_loop(L, ratio):
    N, D = 3, 4
    _, _, ids_restore = reference.random_masking(torch.randn(N, L, D), ratio)
    keep = reference.num_kept(L, ratio)
    x = torch.randn(N, 1 + keep, D, dtype=torch.float64)
    token = torch.randn(1, 1, D, dtype=torch.float64)
    pos = torch.randn(1, 1 + L, D, dtype=torch.float64)
    torch.testing.assert_close(
        reference.mae_unshuffle(x, ids_restore, token, pos), loop_unshuffle(x, ids_restore, token, pos), rtol=0, atol=0
    )


@pytest.mark.parametrize("ratio", RATIOS)
def test_masking_then_unshuffle_restores_kept_tokens(ratio):
    """Encoder masking then decoder unshuffle puts every kept token back in place and mask tokens elsewhere."""
    N, L, D = 2, 13, 5
    x = torch.randn(N, L, D)
    x_masked, mask, ids_restore = reference.random_masking(x, ratio)
    cls = torch.randn(N, 1, D)
    token = torch.randn(D)
    out = reference.mae_unshuffle(torch.cat([cls, x_masked], 1), ids_restore, token)
    assert torch.equal(out[:, 0], cls[:, 0])
    kept = mask == 0
    assert torch.equal(out[:, 1:][kept], x[kept])
    assert torch.equal(out[:, 1:][~kept], token.expand(int((~kept).sum()), D))


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8), 4), ((1, 2, 6, 9), 3), ((2, 1, 5, 5), 5), ((1, 3, 4, 8), 2)])
def test_reference_patchify_matches_loop(shape, p):
    imgs = torch.randn(shape, dtype=torch.float64)
    patches = reference.patchify(imgs, p)
    torch.testing.assert_close(patches, loop_patchify(imgs, p), rtol=0, atol=0)
    grid = (shape[2] // p, shape[3] // p)
    torch.testing.assert_close(reference.unpatchify(patches, p, grid), imgs, rtol=0, atol=0)


@pytest.mark.parametrize("L", NUM_TOKENS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_reference_msn_patch_drop_matches_official(L, ratio):
    x = torch.randn(3, 1 + L, 4)
    perm = torch.randperm(L)
    kept, idx = reference.msn_patch_drop(x, ratio, perm)
    torch.testing.assert_close(kept, official_msn_patch_drop(x, ratio, perm), rtol=0, atol=0)
    assert idx[0] == 0 and idx.shape == (1 + int(L * (1 - ratio)),)
    # one-hot formulation: kept[b] = onehot(idx) @ x[b]
    onehot = torch.nn.functional.one_hot(idx, 1 + L).to(x.dtype)
    torch.testing.assert_close(kept, torch.einsum("kl,bld->bkd", onehot, x))


def test_reference_msn_patch_drop_draws_official_perm():
    x = torch.randn(2, 1 + 49, 3)
    torch.manual_seed(7)
    got, _ = reference.msn_patch_drop(x, 0.3)
    torch.manual_seed(7)
    want = official_msn_patch_drop(x, 0.3, torch.randperm(49))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # ratio 0: the official code skips the patch drop, nothing moves
    kept, idx = reference.msn_patch_drop(x, 0.0)
    assert torch.equal(kept, x) and torch.equal(idx, torch.arange(50))


# --- reference gradients (float64 gradcheck) -----------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.75])
@pytest.mark.parametrize("batched_pos", [False, True])
def test_reference_gradients(ratio, batched_pos):
    N, L, D = 2, 7, 3
    x = torch.randn(N, L, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(N if batched_pos else 1, L, D, dtype=torch.float64, requires_grad=True)
    noise = torch.rand(N, L)
    torch.autograd.gradcheck(lambda a, b: reference.random_masking(a, ratio, noise, b)[0], (x, pos))

    _, _, ids_restore = reference.random_masking(x.detach(), ratio, noise)
    keep = reference.num_kept(L, ratio)
    y = torch.randn(N, 1 + keep, D, dtype=torch.float64, requires_grad=True)
    token = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    dpos = torch.randn(N if batched_pos else 1, 1 + L, D, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, t, b: reference.mae_unshuffle(a, ids_restore, t, b), (y, token, dpos))

    z = torch.randn(N, 1 + L, D, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(L)
    torch.autograd.gradcheck(lambda a: reference.msn_patch_drop(a, ratio, perm)[0], (z,))


# --- public ops: backends vs reference -----------------------------------------------------------------------------

def backends_for(device):
    """Backends that can run the masking ops on ``device`` here (reference always)."""
    out = ["reference"]
    call = vitkernels.dispatch.Call(torch.device(device), torch.float32, {"num_tokens": 16})
    for name in ("native", "triton"):
        if vitkernels.ops.masking.random_masking_op.reasons(call)[name] is None:
            out.append(name)
    return out


def _cases():
    for device in DEVICES:
        for backend in backends_for(device):
            yield device, backend


CASES = list(_cases())


@pytest.mark.parametrize("device,backend", CASES)
def test_public_random_masking_draws_official_noise(device, backend):
    """Without noise, every backend gives the official code's result for the same seed (noise = torch.rand(N, L,
    device)), mask dtype included."""
    x = torch.randn(4, 13, 6, device=device)
    torch.manual_seed(123)
    got = vitkernels.random_masking(x, 0.75, backend=backend)
    torch.manual_seed(123)
    want = official_random_masking(x, 0.75, torch.rand(4, 13, device=device))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("L", NUM_TOKENS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_random_masking_backend(device, backend, L, ratio):
    N, D = 2, 5
    x = torch.randn(N, L, D, device=device)
    pos = torch.randn(1, L, D, device=device)
    noise = torch.rand(N, L, device=device)
    got = vitkernels.random_masking(x, ratio, noise, pos, backend=backend)
    want = reference.random_masking(x.cpu(), ratio, noise.cpu(), pos.cpu())
    for g, w in zip(got, want):
        assert g.device.type == device
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_random_masking_dtypes(device, backend, dtype):
    N, L, D = 2, 13, 6
    x = torch.randn(N, L, D, device=device, dtype=dtype)
    pos = torch.randn(N, L, D, device=device, dtype=dtype)
    noise = _noise(N, L, "ties").to(device)
    x_masked, mask, ids_restore = vitkernels.random_masking(x, 0.75, noise, pos, backend=backend)
    want = loop_random_masking(x.cpu(), 0.75, noise.cpu(), pos.cpu())
    # the official mask is torch.ones([N, L]): the default dtype, whatever x's
    assert x_masked.dtype == dtype and mask.dtype == torch.get_default_dtype() and ids_restore.dtype == torch.int64
    torch.testing.assert_close(ids_restore.cpu(), want[2], rtol=0, atol=0)
    torch.testing.assert_close(mask.cpu(), want[1], rtol=0, atol=0)
    # x + pos in the input dtype: one rounding, as torch's add; bf16 casts truncate under the Triton interpreter
    exact = not (backend == "triton" and device == "cpu" and dtype == torch.bfloat16)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x_masked.cpu(), want[0], **tol)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("noise_dtype", FLOATS)
@pytest.mark.parametrize("kind", ["ties", "nan"])
def test_random_masking_noise_dtypes(device, backend, noise_dtype, kind):
    N, L, D = 3, 13, 2
    x = torch.randn(N, L, D, device=device)
    noise = _noise(N, L, kind).to(device=device, dtype=noise_dtype)
    got = vitkernels.random_masking(x, 0.5, noise, backend=backend)
    want = loop_random_masking(x.cpu(), 0.5, noise.cpu().double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_random_masking_backend_gradients(device, backend, ratio):
    N, L, D = 2, 13, 4
    x = torch.randn(N, L, D, device=device, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, L, D, device=device, dtype=torch.float64, requires_grad=True)
    noise = torch.rand(N, L, device=device)
    out = vitkernels.random_masking(x, ratio, noise, pos, backend=backend)[0]
    g = torch.randn_like(out)
    gx, gpos = torch.autograd.grad(out, (x, pos), g)
    x_ref, pos_ref = x.detach().cpu().requires_grad_(), pos.detach().cpu().requires_grad_()
    want_out = reference.random_masking(x_ref, ratio, noise.cpu(), pos_ref)[0]
    want = torch.autograd.grad(want_out, (x_ref, pos_ref), g.cpu())
    torch.testing.assert_close(gx.cpu(), want[0])
    torch.testing.assert_close(gpos.cpu(), want[1])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("L", NUM_TOKENS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_mae_unshuffle_backend(device, backend, L, ratio):
    N, D = 2, 6
    _, _, ids_restore = reference.random_masking(torch.randn(N, L, 1), ratio)
    keep = reference.num_kept(L, ratio)
    x = torch.randn(N, 1 + keep, D, dtype=torch.float64, requires_grad=True)
    token = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 1 + L, D, dtype=torch.float64, requires_grad=True)
    inputs = (x, token, pos)
    dev = [t.detach().to(device).requires_grad_() for t in inputs]
    out = vitkernels.mae_unshuffle(dev[0], ids_restore.to(device), dev[1], dev[2], backend=backend)
    want = reference.mae_unshuffle(x, ids_restore, token, pos)
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, dev, g.to(device))
    want_grads = torch.autograd.grad(want, inputs, g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_mae_unshuffle_dtypes(device, backend, dtype):
    N, L, D = 3, 13, 5
    _, _, ids_restore = reference.random_masking(torch.randn(N, L, 1), 0.5)
    x = torch.randn(N, 1 + 6, D, dtype=dtype, device=device)
    token = torch.randn(D, dtype=dtype, device=device)
    pos = torch.randn(N, 1 + L, D, dtype=dtype, device=device)
    out = vitkernels.mae_unshuffle(x, ids_restore.to(device).int(), token, pos, backend=backend)
    want = loop_unshuffle(x.cpu(), ids_restore, token.cpu(), pos.cpu())
    exact = not (backend == "triton" and device == "cpu" and dtype == torch.bfloat16)
    torch.testing.assert_close(out.cpu(), want, **(dict(rtol=0, atol=0) if exact else dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("L", NUM_TOKENS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_msn_patch_drop_backend(device, backend, L, ratio):
    B, D = 3, 4
    x = torch.randn(B, 1 + L, D, dtype=torch.float64, device=device, requires_grad=True)
    perm = torch.randperm(L).to(device)
    kept, idx = vitkernels.msn_patch_drop(x, ratio, perm, backend=backend)
    x_ref = x.detach().cpu().requires_grad_()
    want = official_msn_patch_drop(x_ref, ratio, perm.cpu())
    torch.testing.assert_close(kept.cpu(), want, rtol=0, atol=0)
    assert idx.device.type == device and torch.equal(idx.cpu()[1:], 1 + perm.cpu()[: idx.numel() - 1])
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(kept, x, g.to(device))
    (gx_ref,) = torch.autograd.grad(want, x_ref, g)
    torch.testing.assert_close(gx.cpu(), gx_ref, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_msn_patch_drop_draws_official_perm(device, backend):
    x = torch.randn(2, 1 + 13, 3, device=device)
    torch.manual_seed(3)
    kept, _ = vitkernels.msn_patch_drop(x, 0.5, backend=backend)
    torch.manual_seed(3)
    want = official_msn_patch_drop(x.cpu(), 0.5, torch.randperm(13))
    torch.testing.assert_close(kept.cpu(), want, rtol=0, atol=0)


def test_public_patchify_roundtrip_non_square():
    imgs = torch.randn(2, 3, 8, 12)
    patches = vitkernels.mae_patchify(imgs, 4)
    assert patches.shape == (2, 6, 48)
    torch.testing.assert_close(patches, loop_patchify(imgs, 4), rtol=0, atol=0)
    torch.testing.assert_close(vitkernels.mae_unpatchify(patches, 4, (2, 3)), imgs, rtol=0, atol=0)
    square = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(vitkernels.mae_unpatchify(vitkernels.mae_patchify(square, 3), 3), square, rtol=0, atol=0)


# --- bad inputs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratios_raise(ratio):
    x = torch.randn(2, 7, 3)
    with pytest.raises(ValueError, match="mask_ratio"):
        vitkernels.random_masking(x, ratio)
    with pytest.raises(ValueError, match="drop_ratio"):
        vitkernels.msn_patch_drop(torch.randn(2, 8, 3), ratio)
    # the modules refuse at construction, not at their first forward
    with pytest.raises(ValueError, match="mask_ratio"):
        vitkernels.MAEMasking(ratio)
    with pytest.raises(ValueError, match="drop_ratio"):
        vitkernels.MSNPatchDrop(ratio)


def test_bad_inputs_raise():
    x = torch.randn(2, 7, 3)
    with pytest.raises(TypeError, match="mask_ratio"):
        vitkernels.random_masking(x, "0.5")
    with pytest.raises(TypeError, match="mask_ratio"):
        vitkernels.random_masking(x, True)
    with pytest.raises(ValueError, match="x must have 3"):
        vitkernels.random_masking(torch.randn(7, 3), 0.5)
    with pytest.raises(TypeError, match="x must have dtype"):
        vitkernels.random_masking(torch.ones(2, 7, 3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="noise"):
        vitkernels.random_masking(x, 0.5, noise=torch.rand(2, 6))
    with pytest.raises(ValueError, match="pos_embed"):
        vitkernels.random_masking(x, 0.5, pos_embed=torch.randn(1, 8, 3))
    with pytest.raises(TypeError, match="pos_embed"):
        vitkernels.random_masking(x, 0.5, pos_embed=torch.ones(1, 7, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="noise"):
        vitkernels.random_masking(x, 0.5, noise=torch.ones(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise is on meta"):
        vitkernels.random_masking(x, 0.5, noise=torch.rand(2, 7, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        vitkernels.random_masking(x, 0.5, backend="cuda")


def test_bad_unshuffle_inputs_raise():
    N, L, D = 2, 7, 3
    x = torch.randn(N, 1 + 3, D)
    ids = torch.stack([torch.randperm(L) for _ in range(N)])
    token = torch.randn(1, 1, D)
    with pytest.raises(TypeError, match="ids_restore"):
        vitkernels.mae_unshuffle(x, ids.float(), token)
    with pytest.raises(ValueError, match="ids_restore"):
        vitkernels.mae_unshuffle(x, ids[:1], token)
    with pytest.raises(ValueError, match="L must be"):
        vitkernels.mae_unshuffle(torch.randn(N, 1 + 9, D), ids, token)
    with pytest.raises(ValueError, match="mask_token"):
        vitkernels.mae_unshuffle(x, ids, torch.randn(1, 1, D + 1))
    with pytest.raises(TypeError, match="mask_token"):
        vitkernels.mae_unshuffle(x, ids, token.int())
    with pytest.raises(ValueError, match="pos_embed"):
        vitkernels.mae_unshuffle(x, ids, token, torch.randn(1, L, D))
    with pytest.raises(ValueError, match="x must hold the CLS"):
        vitkernels.mae_unshuffle(torch.randn(N, 0, D), ids, token)
    with pytest.raises(ValueError, match="ids_restore is on meta"):
        vitkernels.mae_unshuffle(x, ids.to("meta"), token)
    duplicated = ids.clone()
    duplicated[0, 0] = duplicated[0, 1]  # not a permutation: the scatter would silently keep one of the two
    with pytest.raises(ValueError, match="ids_restore must be a permutation"):
        vitkernels.mae_unshuffle(x, duplicated, token)


def test_bad_msn_and_patchify_inputs_raise():
    x = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="perm"):
        vitkernels.msn_patch_drop(x, 0.5, torch.randperm(6))
    with pytest.raises(ValueError, match="perm must be a permutation"):
        vitkernels.msn_patch_drop(x, 0.5, torch.zeros(7, dtype=torch.int64))
    with pytest.raises(TypeError, match="perm"):
        vitkernels.msn_patch_drop(x, 0.5, torch.randperm(7).float())
    with pytest.raises(ValueError, match="patch_size"):
        vitkernels.mae_patchify(torch.randn(1, 3, 8, 8), 3)
    with pytest.raises(ValueError, match="patch_size"):
        vitkernels.mae_patchify(torch.randn(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="grid_size"):
        vitkernels.mae_unpatchify(torch.randn(1, 6, 12), 2, (2, 2))
    with pytest.raises(ValueError, match="square"):
        vitkernels.mae_unpatchify(torch.randn(1, 6, 12), 2)
    with pytest.raises(ValueError, match="patch_size"):
        vitkernels.mae_unpatchify(torch.randn(1, 4, 10), 2)


@pytest.mark.parametrize("device,backend", CASES)
def test_vit_token_count_multi_block(device, backend):
    """L = 196 (ViT/16 at 224) and D = 160: several blocks of the ranking loop, the row tiles and the channel tiles."""
    N, L, D = 2, 196, 160
    x = torch.randn(N, L, D, device=device, requires_grad=True)
    pos = torch.randn(1, L, D, device=device)
    noise = _noise(N, L, "ties").to(device)
    got = vitkernels.random_masking(x, 0.75, noise, pos, backend=backend)
    want = reference.random_masking(x.detach().cpu(), 0.75, noise.cpu(), pos.cpu())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)
    y = torch.randn(N, 1 + 49, D, device=device, requires_grad=True)
    token = torch.randn(D, device=device, requires_grad=True)
    out = vitkernels.mae_unshuffle(y, got[2], token, backend=backend)
    want_out = loop_unshuffle(y.detach().cpu(), want[2], token.detach().cpu())
    torch.testing.assert_close(out.cpu(), want_out, rtol=0, atol=0)
    g = torch.randn_like(out)
    gy, gt = torch.autograd.grad(out, (y, token), g)
    torch.testing.assert_close(gy[:, 0], g[:, 0], rtol=0, atol=0)
    kept = (want[2] < 49).to(device)
    for n in range(N):  # visible rows' gradient lands on their slot, mask-token rows sum into the token's
        torch.testing.assert_close(gy[n, 1 + got[2][n][kept[n]]], g[n, 1:][kept[n]], rtol=0, atol=0)
    torch.testing.assert_close(gt, g[:, 1:][~kept].sum(0))


# --- mixed dtypes (autocast: half-precision tokens, fp32 tables and mask token) ------------------------------------

@pytest.mark.parametrize("device,backend", CASES)
def test_random_masking_mixed_dtypes(device, backend):
    N, L, D = 2, 13, 6
    x = torch.randn(N, L, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, L, D, device=device, requires_grad=True)
    noise = torch.rand(N, L, device=device)
    got = vitkernels.random_masking(x, 0.75, noise, pos, backend=backend)
    x_ref, pos_ref = x.detach().cpu().requires_grad_(), pos.detach().cpu().requires_grad_()
    want = reference.random_masking(x_ref, 0.75, noise.cpu(), pos_ref)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32  # as the official x + pos_embed
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)
    grad = torch.randn_like(want[0])
    gx, gpos = torch.autograd.grad(got[0], (x, pos), grad.to(device))
    wx, wpos = torch.autograd.grad(want[0], (x_ref, pos_ref), grad)
    assert gx.dtype == torch.bfloat16 and gpos.dtype == torch.float32
    torch.testing.assert_close(gx.cpu(), wx, rtol=1e-2, atol=1e-2)  # bf16 casts truncate under the interpreter
    torch.testing.assert_close(gpos.cpu(), wpos)


@pytest.mark.parametrize("device,backend", CASES)
def test_mae_unshuffle_mixed_dtypes(device, backend):
    N, L, D = 2, 13, 6
    _, _, ids_restore = reference.random_masking(torch.randn(N, L, 1), 0.75)
    x = torch.randn(N, 1 + 3, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    token = torch.randn(1, 1, D, device=device, requires_grad=True)
    pos = torch.randn(1, 1 + L, D, device=device, requires_grad=True)
    out = vitkernels.mae_unshuffle(x, ids_restore.to(device), token, pos, backend=backend)
    refs = [t.detach().cpu().requires_grad_() for t in (x, token, pos)]
    want = reference.mae_unshuffle(refs[0], ids_restore, refs[1], refs[2])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (x, token, pos), grad.to(device))
    exp = torch.autograd.grad(want, refs, grad)
    for a, b in zip(got, exp):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.cpu(), b, rtol=1e-2, atol=1e-2)


# --- Triton custom ops: gradcheck, opcheck, torch.compile ----------------------------------------------------------

TRITON_DEVICES = [d for d, b in CASES if b == "triton"]
FAST_CASES = [(d, b) for d, b in CASES if b in ("triton", "native")]  # the custom-op backends


def _triton_ops():
    from vitkernels.ops import masking as ops_masking

    return ops_masking


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_fast_gradcheck(device, backend, ratio):
    N, L, D = 2, 7, 3
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(N, L, D, **f64, requires_grad=True)
    pos = torch.randn(1, L, D, **f64, requires_grad=True)
    noise = torch.rand(N, L, device=device)
    torch.autograd.gradcheck(
        lambda a, b: vitkernels.random_masking(a, ratio, noise, b, backend=backend)[0], (x, pos), fast_mode=True
    )

    _, _, ids_restore = reference.random_masking(x.detach().cpu(), ratio, noise.cpu())
    ids_restore = ids_restore.to(device)
    keep = reference.num_kept(L, ratio)
    y = torch.randn(N, 1 + keep, D, **f64, requires_grad=True)
    token = torch.randn(D, **f64, requires_grad=True)
    dpos = torch.randn(N, 1 + L, D, **f64, requires_grad=True)

    def unshuffle(a, t, b):
        return vitkernels.mae_unshuffle(a, ids_restore, t, b, backend=backend)

    torch.autograd.gradcheck(unshuffle, (y, token, dpos), fast_mode=True)
    torch.autograd.gradgradcheck(unshuffle, (y, token, dpos), fast_mode=True)

    z = torch.randn(N, 1 + L, D, **f64, requires_grad=True)
    perm = torch.randperm(L).to(device)
    drop = lambda a: vitkernels.msn_patch_drop(a, ratio, perm, backend=backend)[0]  # noqa: E731
    torch.autograd.gradcheck(drop, (z,), fast_mode=True)
    torch.autograd.gradgradcheck(drop, (z,), fast_mode=True)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_fast_opcheck(device, backend):
    ops = torch.ops.vitkernels
    prefix = "triton_" if backend == "triton" else ""
    N, L, D, keep = 2, 7, 4, 3
    x = torch.randn(N, L, D, device=device, requires_grad=True)
    pos = torch.randn(1, L, D, device=device, dtype=torch.float64, requires_grad=True)
    noise = torch.rand(N, L, device=device)
    torch.library.opcheck(getattr(ops, prefix + "random_masking"), (x, noise, keep, pos))
    torch.library.opcheck(getattr(ops, prefix + "random_masking"), (x.detach(), noise, 0, None))

    _, _, ids_restore = reference.mask_by_noise(torch.randn(N, L, 1), noise.cpu(), keep)
    ids_restore = ids_restore.to(device)
    y = torch.randn(N, 1 + keep, D, device=device, requires_grad=True)
    token = torch.randn(D, device=device, requires_grad=True)
    dpos = torch.randn(1, 1 + L, D, device=device, requires_grad=True)
    torch.library.opcheck(getattr(ops, prefix + "mae_unshuffle"), (y, ids_restore, token, dpos))
    torch.library.opcheck(
        getattr(ops, prefix + "mae_unshuffle"), (y.detach().bfloat16(), ids_restore, token.detach(), None)
    )
    grad = torch.randn(N, 1 + L, D, device=device, requires_grad=True)
    torch.library.opcheck(
        getattr(ops, prefix + "mae_unshuffle_backward"), (grad, ids_restore, keep, torch.float32, torch.float32)
    )

    idx = torch.tensor([0, 3, 1, 5], device=device)
    inverse = torch.tensor([0, 2, -1, 1, -1, 3, -1, -1], device=device)
    z = torch.randn(N, 1 + L, D, device=device, requires_grad=True)
    torch.library.opcheck(getattr(ops, prefix + "gather_rows"), (z, idx, inverse, None, None))
    add = torch.randn(N, 1 + L, D, device=device, requires_grad=True)
    torch.library.opcheck(getattr(ops, prefix + "gather_rows"), (z, idx, inverse, add, None))


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_fast_torch_compile_fullgraph(device, backend):
    """The whole MAE masking path (encoder masking, decoder unshuffle, loss) compiles without a graph break."""

    def pipeline(imgs, tokens, noise, pos, cls, token, dpos, backend):
        x_masked, mask, ids_restore = vitkernels.random_masking(tokens, 0.75, noise, pos, backend=backend)
        x = torch.cat([cls.expand(x_masked.shape[0], -1, -1), x_masked], 1)
        x = vitkernels.mae_unshuffle(x, ids_restore, token, dpos, backend=backend) * 2.0
        kept, _ = vitkernels.msn_patch_drop(x, 0.5, torch.arange(x.shape[1] - 1, device=x.device), backend=backend)
        loss_backend = "reference" if backend == "native" else backend  # no native MAE loss kernel
        return vitkernels.mae_loss(imgs, x[:, 1:, :], mask, 2, True, backend=loss_backend) + kept.square().mean()

    N, L, P = 2, 9, 4
    imgs = torch.randn(N, 1, 6, 6, device=device)
    tokens = torch.randn(N, L, P, device=device, requires_grad=True)
    token = torch.randn(1, 1, P, device=device, requires_grad=True)
    args = (torch.rand(N, L, device=device), torch.randn(1, L, P, device=device), torch.randn(1, 1, P, device=device),
            token, torch.randn(1, 1 + L, P, device=device))
    compiled = torch.compile(pipeline, fullgraph=True)
    loss = compiled(imgs, tokens, *args[:3], *args[3:], backend)
    grads = torch.autograd.grad(loss, (tokens, token))
    want = pipeline(imgs, tokens, *args[:3], *args[3:], "reference")
    want_grads = torch.autograd.grad(want, (tokens, token))
    torch.testing.assert_close(loss, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_support_checks(device):
    op = vitkernels.ops.masking.random_masking_op
    call = vitkernels.dispatch.Call(torch.device(device), torch.float32, {"num_tokens": 100_000})
    assert "L^2" in op.reasons(call)["triton"]
    assert op.reasons(vitkernels.dispatch.Call(torch.device(device), torch.float32, {"num_tokens": 196}))["triton"] is None


def test_auto_never_picks_the_interpreter():
    # auto never takes the Triton interpreter on CPU tensors
    choice, _ = vitkernels.ops.masking.random_masking_op.auto_choice(
        vitkernels.dispatch.Call(torch.device("cpu"), torch.float32, {"num_tokens": 16})
    )
    assert choice in ("native", "reference")


# --- modules -------------------------------------------------------------------------------------------------------

class TinyMAE(torch.nn.Module):
    """A two-layer MAE with the official forward_encoder / forward_decoder / forward_loss steps (Linear blocks)."""

    def __init__(self, img=8, p=2, C=3, D=6, Dd=5, ratio=0.75, norm_pix=True):
        super().__init__()
        self.p, self.ratio, self.norm_pix = p, ratio, norm_pix
        L = (img // p) ** 2
        self.embed = torch.nn.Linear(p * p * C, D)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 1 + L, D), requires_grad=False)
        self.block = torch.nn.Linear(D, D)
        self.decoder_embed = torch.nn.Linear(D, Dd)
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, Dd) * 0.02)
        self.decoder_pos_embed = torch.nn.Parameter(torch.randn(1, 1 + L, Dd), requires_grad=False)
        self.decoder_pred = torch.nn.Linear(Dd, p * p * C)

    def official(self, imgs, noise):
        x = self.embed(reference.patchify(imgs, self.p))
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = official_random_masking(x, self.ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self.block(torch.cat([cls, x], dim=1))
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        pred = self.decoder_pred(x)[:, 1:, :]
        target = reference.patchify(imgs, self.p)
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def with_modules(self, imgs, noise, backend):
        from vitkernels.modules.masking import MAEDecoderUnshuffle, MAELoss, MAEMasking

        unshuffle = MAEDecoderUnshuffle(self.mask_token.shape[-1], backend=backend)
        unshuffle.mask_token = self.mask_token  # share the parameter
        x = self.embed(vitkernels.mae_patchify(imgs, self.p))
        x, mask, ids_restore = MAEMasking(self.ratio, backend=backend)(x, self.pos_embed, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self.block(torch.cat([cls, x], dim=1))
        x = unshuffle(self.decoder_embed(x), ids_restore, self.decoder_pos_embed)
        pred = self.decoder_pred(x)[:, 1:, :]
        loss_backend = "reference" if backend == "native" else backend  # no native MAE loss kernel
        return MAELoss(self.p, self.norm_pix, backend=loss_backend)(imgs, pred, mask)


@pytest.mark.parametrize("device,backend", CASES)
def test_modules_in_an_mae(device, backend):
    torch.manual_seed(1)
    model = TinyMAE().double().to(device)
    imgs = torch.randn(3, 3, 8, 8, dtype=torch.float64, device=device)
    noise = torch.rand(3, 16, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    want = model.official(imgs, noise)
    want_grads = torch.autograd.grad(want, params)
    got = model.with_modules(imgs, noise, backend)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", CASES)
def test_msn_patch_drop_module(device, backend):
    from vitkernels.modules.masking import MSNPatchDrop

    x = torch.randn(2, 1 + 13, 4, device=device)
    torch.manual_seed(5)
    kept, idx = MSNPatchDrop(0.4, backend=backend)(x, return_indices=True)
    torch.manual_seed(5)
    want = official_msn_patch_drop(x.cpu(), 0.4, torch.randperm(13))
    torch.testing.assert_close(kept.cpu(), want, rtol=0, atol=0)
    assert idx.shape == (1 + 7,)
    assert MSNPatchDrop(0.0, backend=backend)(x) is x  # ratio 0: the official code skips the drop


def test_module_state_dict_and_repr():
    from vitkernels.modules.masking import MAEDecoderUnshuffle, MAELoss, MAEMasking, MSNPatchDrop

    unshuffle = MAEDecoderUnshuffle(16)
    assert list(unshuffle.state_dict()) == ["mask_token"] and unshuffle.mask_token.shape == (1, 1, 16)
    assert 0 < unshuffle.mask_token.std().item() < 0.1
    assert not list(MAEMasking(0.75).state_dict()) and "mask_ratio=0.75" in repr(MAEMasking(0.75))
    assert "norm_pix_loss=True" in repr(MAELoss(16, True)) and "drop_ratio=0.5" in repr(MSNPatchDrop(0.5))
    assert vitkernels.MAEMasking is MAEMasking and vitkernels.MSNPatchDrop is MSNPatchDrop


# --- CUDA, issue-sized shapes (ViT-L MAE: B=256 at 224, L=196, D=1024, decoder D=512) --------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_vit_large_shapes_bit_exact(dtype):
    N, L, D, Dd = 64, 196, 1024, 512
    x = torch.randn(N, L, D, device="cuda", dtype=dtype, requires_grad=True)
    pos = torch.randn(1, L, D, device="cuda", dtype=dtype)
    noise = torch.rand(N, L, device="cuda")
    got = vitkernels.random_masking(x, 0.75, noise, pos, backend="triton")
    want = reference.random_masking(x, 0.75, noise, pos)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    grad = torch.randn_like(want[0])
    torch.testing.assert_close(torch.autograd.grad(got[0], x, grad)[0], torch.autograd.grad(want[0], x, grad)[0],
                               rtol=0, atol=0)

    y = torch.randn(N, 1 + 49, Dd, device="cuda", dtype=dtype, requires_grad=True)
    token = torch.randn(1, 1, Dd, device="cuda", dtype=dtype, requires_grad=True)
    dpos = torch.randn(1, 1 + L, Dd, device="cuda", dtype=dtype)
    out = vitkernels.mae_unshuffle(y, got[2], token, dpos, backend="triton")
    ref = reference.mae_unshuffle(y, want[2], token, dpos)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    gy, gt = torch.autograd.grad(out, (y, token), g)
    wy, wt = torch.autograd.grad(ref, (y, token), g)
    torch.testing.assert_close(gy, wy, rtol=0, atol=0)
    torch.testing.assert_close(gt.float(), wt.float(), rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)

    z = torch.randn(N, 1 + L, D, device="cuda", dtype=dtype)
    perm = torch.randperm(L, device="cuda")
    kept, idx = vitkernels.msn_patch_drop(z, 0.3, perm, backend="triton")
    torch.testing.assert_close(kept, z[:, idx], rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_auto_picks_triton_and_compiles():
    x = torch.randn(8, 196, 64, device="cuda")
    call = vitkernels.dispatch.Call(x.device, x.dtype, {"num_tokens": 196})
    assert vitkernels.ops.masking.random_masking_op.auto_choice(call)[0] == "triton"
    f = torch.compile(lambda t, n: vitkernels.random_masking(t, 0.75, n), fullgraph=True)
    noise = torch.rand(8, 196, device="cuda")
    for g, w in zip(f(x, noise), reference.random_masking(x, 0.75, noise)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
