"""Seeded differential fuzzing of the native (C++) backend against the reference.

Every case draws random shapes within the supported range (windows larger than the map, shifts past its edge, odd
head dims, empty batches and channels, every float dtype, optional tensors present or not, strided inputs) from its
own seed, runs the op forward and backward natively and through the reference (float64, or float32 for half inputs)
and compares. Window attention runs every CPU instruction-set build (VITKERNELS_CPU_ISA=avx512 | avx2 | baseline).
A second corpus calls the registered ops directly with random, mostly invalid index tensors and sizes: each call
must either raise a RuntimeError naming the argument or, when the input happens to be valid, agree with the
reference; it must never read or write out of bounds (``.ci/sanitize`` runs both corpora under ASan + UBSan).

The number of cases per op is ``$VITKERNELS_FUZZ_CASES`` (default 20; CI's sanitizer stage runs 300). A failure
names its seed: ``pytest tests/test_fuzz_native.py -k "window_attention and 17"`` replays it.
"""
import os
import random

import pytest
import torch

import vitkernels
from vitkernels import _native
from vitkernels.reference import masking as ref_masking
from vitkernels.reference import patch_embed as ref_embed

from fused_ops_helpers import CPU_ISAS, runnable_cpu_isas, widen
from helpers import reference_dtype, tol

pytestmark = pytest.mark.skipif(not _native.is_loaded(), reason=_native.IMPORT_ERROR or "")

CASES = int(os.environ.get("VITKERNELS_FUZZ_CASES", "20"))
SEEDS = range(CASES)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ops = torch.ops.vitkernels


def strided(rng, x):
    """x, or the same values in a non-contiguous layout (sliced from a wider tensor, or a flipped flip)."""
    kind = rng.choice(["contiguous", "contiguous", "sliced", "flipped"])
    if kind == "sliced" and x.dim() > 0:
        return torch.cat([x, torch.zeros_like(x)], dim=-1)[..., : x.shape[-1]]
    if kind == "flipped" and x.dim() > 1:
        return x.flip(1).flip(1) if x.shape[1] > 0 else x
    return x


def leaf(x):
    return x.detach().requires_grad_()


def compare(name, got, want, dtype, describe, scaled=True):
    """got (native, computed from dtype inputs) vs want (reference, in reference_dtype(dtype)): the looser tolerance
    of dtype and got's own dtype (an fp32 table's gradient from fp64 qkv), scaled by the magnitude of the expected
    values (results of sums)."""
    t = max(tol(dtype), tol(got.dtype), key=lambda d: d["rtol"])
    scale = max(1.0, want.abs().max().item()) if scaled and want.numel() else 1.0
    torch.testing.assert_close(got.to(want.dtype), want, rtol=t["rtol"], atol=t["atol"] * scale,
                               msg=lambda m: f"{name} differs for {describe}: {m}")


# --- valid inputs: native == reference --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_window_partition(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B, H, W, C = rng.randint(0, 3), rng.randint(1, 9), rng.randint(1, 9), rng.choice([0, 1, 3, 5, 8])
    window = (rng.randint(1, 8), rng.randint(1, 8))  # often larger than the map
    shift = (rng.randrange(window[0]), rng.randrange(window[1]))
    dtype = rng.choice(DTYPES)
    describe = f"seed {seed}: x {(B, H, W, C)} {dtype} window {window} shift {shift}"
    x = strided(rng, torch.randn(B, H, W, C, dtype=dtype))
    got_in, want_in = leaf(x), leaf(x)
    got = vitkernels.window_partition(got_in, window, shift, backend="native")
    want = vitkernels.window_partition(want_in, window, shift, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{describe}: {m}")
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(got_in.grad, want_in.grad, rtol=0, atol=0, msg=lambda m: f"{describe}: {m}")
    back = vitkernels.window_reverse(got, H, W, window, shift, backend="native")
    torch.testing.assert_close(back, x, rtol=0, atol=0, msg=lambda m: f"{describe}: {m}")


def window_attention_case(rng, seed, version):
    """A random window attention problem: (describe, dtype, tensors, call(tensors, backend)). tensors are qkv, the
    bias table, (V2) the per-head scale and the qkv bias or None; call runs V1 or V2 on them."""
    B, H, W = rng.randint(0, 2), rng.randint(1, 9), rng.randint(1, 9)
    window = (rng.randint(1, 8), rng.randint(1, 8))
    shift = (rng.randrange(window[0]), rng.randrange(window[1]))
    nH, hd = rng.randint(1, 3), rng.choice([1, 2, 3, 5, 7, 8, 9, 16, 17])
    dtype = rng.choice(DTYPES)
    table_dtype = rng.choice([dtype, torch.float32])  # fp32 parameters beside half activations, as under autocast
    with_bias = rng.random() < 0.7
    describe = (f"seed {seed}: V{version} qkv {(B, H, W, 3 * nH * hd)} {dtype} window {window} shift {shift} "
                f"heads {nH} table {table_dtype} bias {with_bias}")
    qkv = strided(rng, torch.randn(B, H, W, 3 * nH * hd).to(dtype))
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), nH).to(table_dtype)
    bias = torch.randn(3 * nH * hd).to(dtype) if with_bias else None
    if version == 1:
        scale = rng.choice([None, 0.3])
        tensors = (qkv, table, bias)

        def call(t, backend):
            return vitkernels.window_attention(t[0], t[1], window, shift, nH, scale, t[2], backend=backend)
    else:
        # tau = exp(clamp(logit_scale, max=log 100)): in (0, 100]. A zero q or k row exercises F.normalize's clamp;
        # its gradient is scaled by 1 / eps = 1e12, past the half types' range (inf there, as in eager torch), so
        # only in fp32 / fp64.
        tensors = (qkv, table, torch.rand(nH).to(table_dtype) * 30 + 0.5, bias)
        if H * W > 0 and B > 0 and dtype in (torch.float32, torch.float64) and rng.random() < 0.3:
            qkv[0, 0, 0, : 2 * nH * hd] = 0

        def call(t, backend):
            return vitkernels.window_attention_v2(t[0], t[1], t[2], window, shift, nH, t[3], backend=backend)
    return describe, dtype, tensors, call


def window_attention_3d_case(rng, seed):
    """A random 3D window attention problem, as window_attention_case: windows often larger than the volume (so
    shifts past its edge), both padding orders, N up to 4 * 4 * 4 tokens."""
    B, D, H, W = rng.randint(0, 2), rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6)
    window = tuple(rng.randint(1, 4) for _ in range(3))
    shift = tuple(rng.randrange(w) for w in window)
    nH, hd = rng.randint(1, 3), rng.choice([1, 2, 3, 5, 8, 9, 16, 17])
    dtype = rng.choice(DTYPES)
    table_dtype = rng.choice([dtype, torch.float32])
    with_bias = rng.random() < 0.7
    pad_first = rng.random() < 0.5
    scale = rng.choice([None, 0.3])
    describe = (f"seed {seed}: 3D qkv {(B, D, H, W, 3 * nH * hd)} {dtype} window {window} shift {shift} heads {nH} "
                f"table {table_dtype} bias {with_bias} pad_before_shift {pad_first}")
    qkv = strided(rng, torch.randn(B, D, H, W, 3 * nH * hd).to(dtype))
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1), nH).to(table_dtype)
    bias = torch.randn(3 * nH * hd).to(dtype) if with_bias else None

    def call(t, backend):
        return vitkernels.window_attention_3d(t[0], t[1], window, shift, nH, scale, t[2], pad_first, backend=backend)
    return describe, dtype, (qkv, table, bias), call


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_window_attention(seed, version, monkeypatch):
    """version 1: Swin, 2: Swin V2, 3: 3D (window_attention_3d)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if version == 3:
        describe, dtype, tensors, call = window_attention_3d_case(rng, seed)
    else:
        describe, dtype, tensors, call = window_attention_case(rng, seed, version)
    names = ("qkv", "table", "scale", "qkv_bias") if version == 2 else ("qkv", "table", "qkv_bias")
    ref_type = reference_dtype(dtype)
    ref_inputs = [leaf(t.to(ref_type)) if t is not None else None for t in tensors]
    want = call(ref_inputs, "reference")
    grad = torch.randn_like(want).to(dtype).to(ref_type)  # the same values the native call gets in its dtype
    needed = [t for t in ref_inputs if t is not None]
    want_grads = torch.autograd.grad(want, needed, grad, allow_unused=True)
    for isa in runnable_cpu_isas():  # (a cap above what this CPU runs would run the best build again)
        monkeypatch.setenv("VITKERNELS_CPU_ISA", isa)
        inputs = [leaf(t) if t is not None else None for t in tensors]
        got = call(inputs, "native")
        assert got.dtype == dtype
        compare("out", got, want, dtype, f"{describe} isa {isa}")
        got_grads = torch.autograd.grad(got, [t for t in inputs if t is not None], grad.to(dtype))
        present = [n for n, t in zip(names, tensors) if t is not None]
        for name, g, w, v in zip(present, got_grads, want_grads, needed):
            compare(f"grad {name}", g, torch.zeros_like(v) if w is None else w, dtype, f"{describe} isa {isa}")


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_random_masking(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    N, L, D = rng.randint(0, 3), rng.randint(1, 40), rng.choice([0, 1, 4, 7])
    ratio = rng.choice([0.0, 0.25, 0.5, 0.75, 0.9, rng.random()])
    dtype = rng.choice(DTYPES)
    pos_kind = rng.choice([None, "shared", "per-sample"])
    pos_dtype = rng.choice([dtype, torch.float32])
    describe = f"seed {seed}: x {(N, L, D)} {dtype} ratio {ratio} pos {pos_kind} {pos_dtype}"
    x = strided(rng, torch.randn(N, L, D, dtype=dtype))
    noise = torch.rand(N, L)
    if rng.random() < 0.2 and N * L:
        noise[0, rng.randrange(L)] = noise[0, 0]  # ties: the stable sort keeps patch order
    pos = None if pos_kind is None else torch.randn(1 if pos_kind == "shared" else N, L, D, dtype=pos_dtype)
    got_in = [leaf(x), leaf(pos) if pos is not None else None]
    want_in = [leaf(x), leaf(pos) if pos is not None else None]
    got = vitkernels.random_masking(got_in[0], ratio, noise, got_in[1], backend="native")
    want = ref_masking.random_masking(want_in[0], ratio, noise, want_in[1])
    for name, g, w in zip(("x_masked", "mask", "ids_restore"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{name} differs for {describe}: {m}")
    grad = torch.randn_like(want[0])
    got_grads = torch.autograd.grad(got[0], [t for t in got_in if t is not None], grad)
    want_grads = torch.autograd.grad(want[0], [t for t in want_in if t is not None], grad)
    for g, w in zip(got_grads, want_grads):
        compare("grad", g, w, w.dtype, describe)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_mae_unshuffle(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    N, L, D = rng.randint(0, 3), rng.randint(1, 40), rng.choice([0, 1, 4, 7])
    keep = rng.randint(0, L)
    dtype = rng.choice(DTYPES)
    token_dtype = rng.choice([dtype, torch.float32])
    pos_kind = rng.choice([None, "shared", "per-sample"])
    describe = f"seed {seed}: x {(N, 1 + keep, D)} L {L} {dtype} token {token_dtype} pos {pos_kind}"
    x = strided(rng, torch.randn(N, 1 + keep, D, dtype=dtype))
    ids = torch.stack([torch.randperm(L) for _ in range(N)]) if N else torch.zeros(0, L, dtype=torch.long)
    ids = ids.to(rng.choice([torch.int64, torch.int32]))
    token = torch.randn(1, 1, D, dtype=token_dtype)
    pos = None if pos_kind is None else torch.randn(1 if pos_kind == "shared" else N, L + 1, D)
    got_in = [leaf(x), leaf(token)] + ([leaf(pos)] if pos is not None else [])
    want_in = [leaf(x), leaf(token)] + ([leaf(pos)] if pos is not None else [])
    got = vitkernels.mae_unshuffle(got_in[0], ids, got_in[1], got_in[2] if pos is not None else None,
                                   backend="native")
    want = ref_masking.mae_unshuffle(want_in[0], ids.long(), want_in[1].reshape(D),
                                     want_in[2] if pos is not None else None)
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{describe}: {m}")
    grad = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, got_in, grad), torch.autograd.grad(want, want_in, grad)):
        compare("grad", g, w, w.dtype, describe)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_msn_patch_drop(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B, L, D = rng.randint(0, 3), rng.randint(0, 30), rng.choice([0, 1, 4, 7])
    ratio = rng.choice([0.0, 0.3, 0.5, 0.9])
    dtype = rng.choice(DTYPES)
    describe = f"seed {seed}: x {(B, 1 + L, D)} {dtype} ratio {ratio}"
    x = strided(rng, torch.randn(B, 1 + L, D, dtype=dtype))
    perm = torch.randperm(L).to(rng.choice([torch.int64, torch.int32]))
    got_in, want_in = leaf(x), leaf(x)
    got, idx = vitkernels.msn_patch_drop(got_in, ratio, perm, backend="native")
    want, want_idx = vitkernels.msn_patch_drop(want_in, ratio, perm, backend="reference")
    torch.testing.assert_close(idx, want_idx)
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{describe}: {m}")
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(got_in.grad, want_in.grad, rtol=0, atol=0, msg=lambda m: f"{describe}: {m}")


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_patch_embed(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    ph, pw = rng.randint(1, 5), rng.randint(1, 5)
    dynamic = rng.random() < 0.5
    B, C, D = rng.randint(0, 2), rng.randint(1, 4), rng.randint(1, 9)
    if dynamic:
        H, W = rng.randint(1, 12), rng.randint(1, 12)
    else:
        H, W = ph * rng.randint(1, 3), pw * rng.randint(1, 3)
    P = rng.randint(0, 3)
    no_embed_class = rng.random() < 0.5
    with_bias, with_pos = rng.random() < 0.7, rng.random() < 0.7
    dtype = rng.choice(DTYPES)
    gh, gw = ref_embed.grid_size(H, W, (ph, pw), dynamic)
    describe = (f"seed {seed}: x {(B, C, H, W)} {dtype} patch {(ph, pw)} D {D} prefix {P} dynamic {dynamic} "
                f"no_embed_class {no_embed_class} bias {with_bias} pos {with_pos}")
    x = torch.randn(B, C, H, W, dtype=dtype)
    if rng.random() < 0.3:
        x = x.contiguous(memory_format=torch.channels_last)
    tensors = {
        "x": x,
        "weight": torch.randn(D, C, ph, pw, dtype=dtype) / (C * ph * pw) ** 0.5,
        "bias": torch.randn(D, dtype=dtype) if with_bias else None,
        "pos_embed": torch.randn(1, (gh * gw) + (0 if no_embed_class else P), D, dtype=dtype) if with_pos else None,
        "prefix_tokens": torch.randn(1, P, D, dtype=dtype) if P else None,
    }
    ref_type = reference_dtype(dtype)

    def run(backend, cast):
        inputs = {k: leaf(cast(v)) if v is not None else None for k, v in tensors.items()}
        out = vitkernels.patch_embed(*inputs.values(), no_embed_class=no_embed_class, dynamic_img_pad=dynamic,
                                     backend=backend)
        return out, {k: v for k, v in inputs.items() if v is not None}

    got, got_in = run("native", lambda t: t)
    want, want_in = run("reference", lambda t: t.to(ref_type))
    compare("out", got, want, dtype, describe)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, list(got_in.values()), grad.to(dtype))
    want_grads = torch.autograd.grad(want, list(want_in.values()), grad)
    for name, g, w in zip(got_in, got_grads, want_grads):
        compare(f"grad {name}", g, w, dtype, describe)


# --- invalid inputs: a clear error or the reference's answer, never an out-of-bounds access ----------------------

def random_ids(rng, N, L):
    """(N, L) ranks: a permutation per row, then sometimes corrupted (out of range, repeated, huge)."""
    ids = torch.stack([torch.randperm(L) for _ in range(N)]) if N else torch.zeros(0, L, dtype=torch.long)
    for _ in range(rng.choice([0, 0, 1, 2])):
        if N * L == 0:
            break
        n, l = rng.randrange(N), rng.randrange(L)
        ids[n, l] = rng.choice([-1, -L - 5, L, L + 3, 2 ** 40, -(2 ** 40), ids[n, rng.randrange(L)].item()])
    return ids


def is_permutation(ids):
    L = ids.shape[1]
    return bool(torch.equal(ids.sort(dim=1).values, torch.arange(L).expand_as(ids))) if ids.numel() else True


def raises_or(thunk, match):
    """Call thunk: return its result, or None when it raised a RuntimeError matching ``match``."""
    try:
        return thunk()
    except RuntimeError as exc:
        assert any(m in str(exc) for m in match), f"unexpected error: {exc}"
        return None


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_bad_unshuffle_ids(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    N, L, D = rng.randint(1, 3), rng.randint(1, 20), rng.randint(1, 5)
    keep = rng.randint(0, L)
    ids = random_ids(rng, N, L)
    x, token, grad = torch.randn(N, 1 + keep, D), torch.randn(D), torch.randn(N, L + 1, D)
    valid = is_permutation(ids)
    out = raises_or(lambda: ops.mae_unshuffle(x, ids, token, None), ["ids_restore must be a permutation"])
    assert (out is not None) == valid, f"seed {seed}: ids {ids.tolist()}"
    if valid:
        torch.testing.assert_close(out, ref_masking.mae_unshuffle(x, ids, token, None))
    back = raises_or(lambda: ops.mae_unshuffle_backward(grad, ids, keep, torch.float32, torch.float32),
                     ["ids_restore must be a permutation"])
    assert (back is not None) == valid, f"seed {seed}: ids {ids.tolist()}"


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_bad_gather_ids(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    N, S, K, D = rng.randint(1, 3), rng.randint(1, 12), rng.randint(0, 12), rng.randint(1, 4)
    shared = rng.random() < 0.4
    rows = 1 if shared else N
    idx = torch.randint(-3, S + 3, (rows, K))
    inverse = torch.full((rows, S), -1, dtype=torch.long)
    for r in range(rows):
        for k in range(K):
            if 0 <= idx[r, k] < S and rng.random() < 0.9:
                inverse[r, idx[r, k]] = k
    if rng.random() < 0.3 and S:
        inverse[0, rng.randrange(S)] = rng.randint(-2, K + 2)
    if shared:
        idx, inverse = idx[0], inverse[0]
    src = torch.randn(N, S, D)
    add = rng.choice([None, torch.randn(1, S, D), torch.randn(N, S, D)])
    # valid when idx and inverse are each other's inverse where in range
    consistent = all(
        all(not (0 <= i < S) or v[i] == k for k, i in enumerate(ix.tolist()))
        and all(not (0 <= j < K) or ix[j] == s for s, j in enumerate(v.tolist()))
        for ix, v in zip(idx.reshape(rows, K), inverse.reshape(rows, S))
    )
    out = raises_or(lambda: ops.gather_rows(src, idx, inverse, add, None), ["inverse_idx must be the inverse"])
    assert (out is not None) == consistent, f"seed {seed}: idx {idx.tolist()} inverse {inverse.tolist()}"
    if consistent:
        ix = idx.expand(N, K) if shared else idx
        ok = (ix >= 0) & (ix < S)
        gathered = torch.gather(src + (add if add is not None else 0), 1,
                                ix.clamp(0, max(S - 1, 0)).unsqueeze(-1).expand(N, K, D))
        torch.testing.assert_close(out, torch.where(ok.unsqueeze(-1), gathered, 0.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_bad_window_sizes(seed):
    """Random window / shift / image sizes, some absurd: a clear error or the reference's windows."""
    rng = random.Random(seed)
    H, W, C = rng.randint(0, 6), rng.randint(0, 6), rng.randint(0, 3)
    window = [rng.choice([0, 1, 3, 8, -1]) for _ in range(2)]
    if rng.random() < 0.3:  # tokens per window past int64 (sizes that fit but would not be allocatable are left out)
        window = list(rng.choice([(2 ** 40, 2 ** 40), (2 ** 62, 3), (3, 2 ** 62), (2 ** 32, 2 ** 31)]))
    shift = [rng.choice([0, 1, 2, 7, -1, window[i] - 1 if window[i] > 0 else 0]) for i in range(2)]
    x = torch.randn(1, H, W, C)
    expected_errors = ["window_size must be", "shift_size must satisfy", "image must be non-empty", "overflows int64"]
    out = raises_or(lambda: ops.window_partition(x, window, shift), expected_errors)
    valid = H > 0 and W > 0 and all(w > 0 for w in window) and all(0 <= s < w for s, w in zip(shift, window))
    if out is not None:
        assert valid
        torch.testing.assert_close(out, vitkernels.window_partition(x, tuple(window), tuple(shift),
                                                                    backend="reference"))
        back = ops.window_reverse(out, H, W, window, shift)
        torch.testing.assert_close(back, x, rtol=0, atol=0)
    elif valid:  # refused only for sizes that overflow int64
        assert window[0] * window[1] > 2 ** 63 - 1, f"seed {seed}: a valid call {window} {shift} {(H, W)} was refused"


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_bad_window_attention_3d_sizes(seed):
    """Random 3D windows / shifts / volumes / heads / table shapes, some absurd, straight into the registered op: a
    clear error or the reference's answer."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    D, H, W = (rng.randint(0, 4) for _ in range(3))
    nH, hd = rng.choice([1, 2, 0, -1]), rng.randint(1, 3)
    window = [rng.choice([0, 1, 2, 5, -1]) for _ in range(3)]
    if rng.random() < 0.25:  # sizes past int64
        window = list(rng.choice([(2 ** 40, 2 ** 40, 1), (2 ** 62, 3, 1), (1, 2 ** 32, 2 ** 31), (2 ** 21,) * 3]))
    shift = [rng.choice([0, 1, 4, -1, window[i] - 1 if window[i] > 0 else 0]) for i in range(3)]
    heads = max(nH, 1)
    rows = 1
    for w in window:
        rows *= max(2 * w - 1, 1)
    table_rows = rows if rng.random() < 0.8 and rows < 10 ** 6 else rng.randint(1, 30)
    qkv = torch.randn(1, D, H, W, 3 * heads * hd)
    table = torch.randn(table_rows, heads)
    bias = torch.randn(3 * heads * hd) if rng.random() < 0.5 else None
    pad_first = rng.random() < 0.5
    expected_errors = ["window_size must", "shift_size must", "volume must be non-empty", "overflows int64",
                       "relative_position_bias_table must be", "is not 3 * num_heads * head_dim"]
    out = raises_or(lambda: ops.window_attention_3d(qkv, table, bias, window, shift, nH, 0.5, pad_first),
                    expected_errors)
    valid = (min(D, H, W) > 0 and nH > 0 and all(w > 0 for w in window)
             and all(0 <= s < w for s, w in zip(shift, window)) and table_rows == rows)
    if out is not None:
        assert valid, f"seed {seed}: an invalid call {window} {shift} {(D, H, W)} {nH} {table_rows} ran"
        want = vitkernels.window_attention_3d(qkv, table, window, shift, nH, 0.5, bias, pad_first,
                                              backend="reference")
        torch.testing.assert_close(out[0], want)
    elif valid:  # refused only for sizes that overflow int64
        n = window[0] * window[1] * window[2]
        assert n * n * nH > 2 ** 63 - 1, f"seed {seed}: a valid call {window} {shift} {(D, H, W)} was refused"


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_cpu_gemm(seed, monkeypatch):
    """vitkernels' own GEMM (cpu_gemm) on random shapes (0 included; K past the split-over-K threshold at times),
    strided or transposed operands, an optional bias, every instruction set, one or two threads; some operands of
    the wrong size or dtype: a clear error naming the argument, or float64's values and gradients."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    monkeypatch.setenv("VITKERNELS_CPU_ISA", rng.choice(CPU_ISAS))
    M, N = rng.randint(0, 40), rng.randint(0, 40)
    K = rng.choice([rng.randint(0, 50), rng.randint(380, 800), rng.randint(1536, 2000)])
    lead = [M] if rng.random() < 0.7 else [rng.randint(0, 3), M]

    def operand(shape):
        if rng.random() < 0.5 and len(shape) == 2:
            return strided(rng, torch.randn(shape[::-1])).t()  # transposed
        return strided(rng, torch.randn(shape))

    a, b = operand([*lead, K]), operand([K, N])
    bias = operand([N]) if rng.random() < 0.6 else None
    wrong = rng.random() < 0.1
    if wrong:
        choice = rng.choice(["k", "bias", "dtype"])
        if choice == "k":
            b = torch.randn(K + 1, N)
        elif choice == "bias":
            bias = torch.randn(N + 1)
        else:
            a = a.double()
    args = [leaf(t) if t is not None else None for t in (a, b, bias)]
    before = torch.get_num_threads()
    torch.set_num_threads(rng.choice([1, 2]))
    try:
        out = raises_or(lambda: ops.cpu_gemm(*args), ["must agree on K", "bias must be", "must be float32"])
    finally:
        torch.set_num_threads(before)
    ran = out is not None
    assert ran == (not wrong), f"seed {seed}: wrong={wrong}, but the op {'ran' if ran else 'raised'}"
    if out is None:
        return
    describe = f"seed {seed}: a {tuple(a.shape)} {a.stride()}, b {tuple(b.shape)} {b.stride()}, bias {bias is not None}"
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    want = ref[0] @ ref[1] + (ref[2] if bias is not None else 0)
    compare("cpu_gemm", out, want, torch.float32, describe)
    if out.numel():
        grad = torch.randn_like(want)
        got = torch.autograd.grad(out, [t for t in args if t is not None], grad.float())
        wanted = torch.autograd.grad(want, [t for t in ref if t is not None], grad)
        for g, w in zip(got, wanted):
            compare("cpu_gemm gradient", g, w, torch.float32, describe)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_gelu_mlp(seed):
    """Random widths (0 included), row counts, block sizes, strides and optional biases, some operands of the wrong
    size or dtype: a clear error naming the argument, or the reference's values and gradients."""
    from vitkernels.reference.gelu_mlp import gelu_mlp as reference_gelu_mlp

    rng = random.Random(seed)
    torch.manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.float64])
    lead = [rng.randint(0, 4) for _ in range(rng.randint(1, 3))]
    C, H, N = rng.randint(0, 20), rng.randint(0, 40), rng.randint(1, 10)
    block_rows = rng.choice([0, 1, 2, 3, 7, 100])

    def operand(shape, wrong):
        if rng.random() < 0.08:  # the wrong size or dtype
            return torch.randn([s + 1 for s in shape]) if wrong == "size" else torch.randn(shape, dtype=torch.float16)
        return strided(rng, torch.randn(shape, dtype=dtype))

    x = strided(rng, torch.randn(*lead, C, dtype=dtype))
    w1, w2 = operand([H, C], rng.choice(["size", "dtype"])), operand([N, H], rng.choice(["size", "dtype"]))
    b1 = operand([H], rng.choice(["size", "dtype"])) if rng.random() < 0.7 else None
    b2 = operand([N], rng.choice(["size", "dtype"])) if rng.random() < 0.7 else None
    args = [leaf(t) if t is not None and t.dtype == dtype else t for t in (x, w1, b1, w2, b2)]
    own = rng.random() < 0.5  # the blocks' float32 GEMMs on vitkernels' own GEMM (csrc/cpu/gemm.cpp)
    out = raises_or(lambda: ops.gelu_mlp(*args, "none", block_rows, own),
                    ["w1 must be", "w2 must be", "b1 must be", "b2 must be"])
    valid = all(t is None or t.dtype == dtype for t in (w1, b1, w2, b2)) and w1.shape == (H, C) \
        and w2.shape == (N, H) and (b1 is None or b1.shape == (H,)) and (b2 is None or b2.shape == (N,))
    assert (out is not None) == valid, f"seed {seed}: valid={valid} but the op {'ran' if out is not None else 'raised'}"
    if out is None:
        return
    describe = f"seed {seed}: x {tuple(x.shape)}, H {H}, N {N}, block_rows {block_rows}, {dtype}, own GEMM {own}"
    ref_args = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    want = reference_gelu_mlp(*ref_args)
    compare("gelu_mlp", out, want, dtype, describe)
    if out.numel():
        grad = torch.randn_like(want)
        got = torch.autograd.grad(out, [t for t in args if t is not None], grad.to(dtype), allow_unused=True)
        wanted = torch.autograd.grad(want, [t for t in ref_args if t is not None], grad, allow_unused=True)
        for g, w in zip(got, wanted):
            if w is not None:
                compare("gelu_mlp gradient", g, w, dtype, describe)
        # the training pair (gelu_mlp_train keeps fc1's output, gelu_mlp_backward runs by blocks) on the same GEMMs
        y, pre = ops.gelu_mlp_train(*[t.detach() if t is not None else None for t in args], "none", block_rows, own)
        compare("gelu_mlp_train", y, want, dtype, describe)
        grads = ops.gelu_mlp_backward(grad.to(dtype), x, pre, w1, b1, w2, "none", block_rows, own)
        names = [n for n, t in zip(("x", "w1", "b1", "w2", "b2"), args) if t is not None]
        by_name = dict(zip(names, wanted))
        for name, g in zip(("x", "w1", "b1", "w2", "b2"), grads):
            if by_name.get(name) is not None:
                compare(f"gelu_mlp_backward grad_{name}", g, by_name[name], dtype, describe)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_gelu_mlp_eager(seed, monkeypatch):
    """gelu_mlp_eager (the unblocked MLP on vitkernels' own GEMM, the GELU in its epilogues) on random widths (0
    included in M, C, H and N; at times one of C, N past the 384-deep K pass or H past the 2048-column block), leading
    dims, strided or transposed operands, optional biases, either GELU, every instruction set, one or two threads;
    some operands of the wrong size or dtype: a clear error naming the argument, or the reference's values and
    gradients (and inference bitwise the training forward). Odd seeds run gelu_mlp_own instead (the same forward and
    backward as plain ops, for torch.compile; its autograd in Python)."""
    from vitkernels.reference.gelu_mlp import gelu_mlp as reference_gelu_mlp

    name = "gelu_mlp_own" if seed % 2 else "gelu_mlp_eager"
    if not hasattr(ops, name):
        pytest.skip(f"vitkernels._C has no {name}")

    def run(*args, keep_pre=True):
        if name == "gelu_mlp_eager":
            return ops.gelu_mlp_eager(*args)
        return ops.gelu_mlp_own(*args, keep_pre)[0]

    rng = random.Random(seed)
    torch.manual_seed(seed)
    monkeypatch.setenv("VITKERNELS_CPU_ISA", rng.choice(CPU_ISAS))
    lead = [rng.randint(0, 4) for _ in range(rng.randint(1, 3))]
    C, H, N = rng.randint(0, 24), rng.randint(0, 40), rng.randint(0, 24)
    large = rng.choice([None, None, None, "C", "H", "N"])  # one width past a blocking threshold, the others small
    if large == "C":
        C = rng.randint(385, 420)
    elif large == "H":
        H, C, N = rng.randint(2049, 2080), rng.randint(0, 8), rng.randint(0, 8)
    elif large == "N":
        N = rng.randint(385, 420)
    approximate = rng.choice(["none", "tanh"])
    wrong = None
    if rng.random() < 0.15:
        wrong = (rng.choice(["x", "w1", "b1", "w2", "b2"]), rng.choice(["size", "dtype"]))

    def operand(name, shape):
        if wrong is not None and wrong[0] == name and name != "x":
            return torch.randn([s + 1 for s in shape]) if wrong[1] == "size" else torch.randn(shape).double()
        if len(shape) == 2 and rng.random() < 0.3:
            return strided(rng, torch.randn(shape[::-1])).t()  # transposed
        return strided(rng, torch.randn(shape))

    x = strided(rng, torch.randn(*lead, C))
    if wrong is not None and wrong[0] == "x":  # float64 x: alone ("size"), or with every operand float64 ("dtype")
        x = x.double()
    w1, w2 = operand("w1", [H, C]), operand("w2", [N, H])
    b1 = operand("b1", [H]) if rng.random() < 0.7 or (wrong and wrong[0] == "b1") else None
    b2 = operand("b2", [N]) if rng.random() < 0.7 or (wrong and wrong[0] == "b2") else None
    if wrong == ("x", "dtype"):
        w1, b1, w2, b2 = [t.double() if t is not None else None for t in (w1, b1, w2, b2)]
    args = [leaf(t) if t is not None else None for t in (x, w1, b1, w2, b2)]
    describe = (f"seed {seed}: x {tuple(x.shape)} {x.dtype}, H {H}, N {N}, b1 {b1 is not None}, b2 {b2 is not None}, "
                f"{approximate}, wrong {wrong}")
    threads = rng.choice([1, 2])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = raises_or(lambda: run(*args, approximate),
                        ["w1 must be", "w2 must be", "b1 must be", "b2 must be", "must be float32"])
        valid = all(t is None or t.dtype == torch.float32 for t in args) and w1.shape == (H, C) \
            and w2.shape == (N, H) and (b1 is None or b1.shape == (H,)) and (b2 is None or b2.shape == (N,))
        ran = out is not None
        assert ran == valid, f"{describe}: valid={valid} but the op {'ran' if ran else 'raised'}"
        if not ran:
            return
        ref_args = [t.detach().double().requires_grad_() if t is not None else None for t in args]
        want = reference_gelu_mlp(*ref_args, approximate)
        compare(name, out, want, torch.float32, describe)
        with torch.no_grad():
            assert torch.equal(run(*args, approximate, keep_pre=False), out.detach()), describe
        grad = torch.randn_like(want)
        got = torch.autograd.grad(out, [t for t in args if t is not None], grad.float())
        wanted = torch.autograd.grad(want, [t for t in ref_args if t is not None], grad)
    finally:
        torch.set_num_threads(before)
    for arg, g, w in zip([n for n, t in zip(("x", "w1", "b1", "w2", "b2"), args) if t is not None], got, wanted):
        compare(f"{name} grad_{arg}", g, w, torch.float32, describe)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_row_ops_bfloat16(seed, monkeypatch):
    """The row ops on bfloat16 (chunks of rows through float scratch, a chunk inside one sample; the post-norm op
    through a float copy) and patch merging
    (row by row), functional, in place and backward: random sample counts, rows per sample and widths (0 included,
    chunk sizes crossed), maps with odd sides, optional bias / drop-path scale / LayerNorm affine / gradient into x1,
    bf16 or fp32 parameters (autocast), an ISA each: the rows bitwise the float ops on the widened inputs, rounded;
    the column sums within float rounding."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    isa = rng.choice(CPU_ISAS)
    monkeypatch.setenv("VITKERNELS_CPU_ISA", isa)
    # 9000 columns: one row per chunk, so a few dozen rows cross as many chunks (300 of them made this test a quarter
    # of the sanitizer stage)
    N, C = rng.randint(1, 4), rng.choice([0, 1, 7, 16, 33, 96, 200, 9000])
    R = rng.randint(0, 300 if C < 9000 else 40)
    shape = (N, R, C)
    param = rng.choice([torch.bfloat16, torch.float32])
    y, r, g, g1 = (torch.randn(shape).mul(rng.choice([1.0, 1e3])).bfloat16() for _ in range(4))
    b = torch.randn(C).to(param) if rng.random() < 0.7 else None
    s = torch.rand(N).to(param) if rng.random() < 0.5 else None
    w = torch.randn(C).to(param) if rng.random() < 0.7 else None
    lb = torch.randn(C).to(param) if rng.random() < 0.7 else None
    g1 = g1 if rng.random() < 0.5 else None
    describe = f"seed {seed}: {shape}, bias {b is not None}, scale {s is not None}, {param} parameters, {isa}"

    def same(got, want, name):
        want = want.bfloat16()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name} differs for {describe}"

    def close(got, want, name):
        assert got.dtype == param, f"{name}: {got.dtype} for {describe}"
        want = want.to(param).double()
        tol_ = dict(rtol=1e-2, atol=1e-2) if param == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        scale_ = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        torch.testing.assert_close(got.double(), want, rtol=tol_["rtol"], atol=tol_["atol"] * scale_,
                                   msg=lambda m: f"{name} for {describe}: {m}")

    want = ops.bias_residual(*widen(y, b, r, s))
    same(ops.bias_residual(y, b, r, s), want, "bias_residual")
    got = y.clone()
    ops.bias_residual_(got, b, r, s)
    same(got, want, "bias_residual_")
    x1_f, out_f, mean_f, rstd_f = ops.bias_residual_layernorm(*widen(y, b, r, s, w, lb), 1e-5)
    x1, out, mean, rstd = ops.bias_residual_layernorm(y, b, r, s, w, lb, 1e-5)
    same(x1, x1_f, "bias_residual_layernorm x1")
    same(out, out_f, "bias_residual_layernorm out")
    for got, want in ((mean, mean_f), (rstd, rstd_f)):  # width 0: mean 0, rstd NaN as ATen's LayerNorm
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"row statistics for {describe}")
    got, normed = y.clone(), torch.empty_like(y)
    ops.bias_residual_layernorm_(got, b, r, s, w, lb, 1e-5, normed)
    same(got, x1_f, "bias_residual_layernorm_ x1")
    same(normed, out_f, "bias_residual_layernorm_ out")
    got = ops.bias_residual_layernorm_backward(g1, g, x1, mean, rstd, w, s)
    want = ops.bias_residual_layernorm_backward(*widen(g1, g, x1), mean, rstd, *widen(w, s))
    same(got[0], want[0], "bias_residual_layernorm_backward grad residual")
    if s is not None:
        same(got[1], want[1], "bias_residual_layernorm_backward grad y")
    if w is not None:
        for name, k in (("grad bias", 2), ("grad weight", 3), ("grad ln_bias", 4)):
            close(got[k], want[k], f"bias_residual_layernorm_backward {name}")
    # the post-norm op converts bfloat16 whole to float and back: the float op on the widened inputs, rounded
    want_out, mean_f, rstd_f = ops.bias_layernorm_residual(*widen(y, b, r, s, w, lb), 1e-5)
    post, mean, rstd = ops.bias_layernorm_residual(y, b, r, s, w, lb, 1e-5)
    same(post, want_out, "bias_layernorm_residual")
    torch.testing.assert_close(mean, mean_f, rtol=0, atol=0, equal_nan=True, msg=f"post-norm mean for {describe}")
    got = y.clone()
    ops.bias_layernorm_residual_(got, b, r, s, w, lb, 1e-5)
    same(got, want_out, "bias_layernorm_residual_")
    got = ops.bias_layernorm_residual_backward(g, y, b, mean, rstd, w, s)
    want = ops.bias_layernorm_residual_backward(*widen(g, y, b), mean_f, rstd_f, *widen(w, s))
    same(got[0], want[0], "bias_layernorm_residual_backward grad y")
    if b is not None and w is not None:
        for name, k in (("grad bias", 1), ("grad weight", 2), ("grad ln_bias", 3)):
            close(got[k], want[k], f"bias_layernorm_residual_backward {name}")
    if b is not None:
        approximate = rng.choice(["none", "tanh"])
        want = ops.bias_gelu(*widen(y, b), approximate)
        same(ops.bias_gelu(y, b, approximate), want, "bias_gelu")
        got = y.clone()
        ops.bias_gelu_(got, b, approximate)
        same(got, want, "bias_gelu_")
        dx, db = ops.bias_gelu_backward(g, y, b, approximate)
        want_dx, want_db = ops.bias_gelu_backward(*widen(g, y, b), approximate)
        same(dx, want_dx, "bias_gelu_backward dx")
        close(db, want_db, "bias_gelu_backward grad bias")
    # patch merging's gather + LayerNorm: a (B, H, W, c) map, odd sides padded, 4c channels normalised
    B, H, W, c = rng.randint(0, 3), rng.randint(1, 9), rng.randint(1, 9), rng.choice([1, 3, 8, 24, 50])
    x = torch.randn(B, H, W, c).mul(rng.choice([1.0, 1e3])).bfloat16()
    pw, pb = (torch.randn(4 * c).to(param), torch.randn(4 * c).to(param)) if rng.random() < 0.7 else (None, None)
    out, mean, rstd = ops.patch_merging_norm(x, pw, pb, 1e-5)
    want, want_mean, want_rstd = ops.patch_merging_norm(*widen(x, pw, pb), 1e-5)
    same(out, want, f"patch_merging_norm of {tuple(x.shape)}")
    assert torch.equal(mean, want_mean) and torch.equal(rstd, want_rstd), f"patch merging statistics: {describe}"
    g = torch.randn(out.shape).bfloat16()
    got = ops.patch_merging_norm_backward(g, x, mean, rstd, pw)
    want = ops.patch_merging_norm_backward(*widen(g, x), mean, rstd, *widen(pw))
    same(got[0], want[0], f"patch_merging_norm_backward grad x of {tuple(x.shape)}")
    if pw is not None:
        close(got[1], want[1], "patch_merging_norm_backward grad weight")
        close(got[2], want[2], "patch_merging_norm_backward grad bias")
