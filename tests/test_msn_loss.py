"""MSN loss: reference vs the official arithmetic re-derived, closed forms, Sinkhorn, gradients, extremes, modules,
validation."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.reference import msn_loss as reference

from helpers import assert_close


# --- independent formulations -------------------------------------------------------------------------------------

def official_style(anchors, targets, prototypes, proto_labels, num_views, tau, T, me_max, use_entropy,
                   use_sinkhorn=False):
    """The official ``loss(...)`` arithmetic written out literally: softmax @ labels, p ** (1/T), log(p ** -t)."""
    K = prototypes.shape[0]
    labels = torch.eye(K, dtype=anchors.dtype) if proto_labels is None else proto_labels

    def snn(q):
        return torch.softmax(F.normalize(q) @ F.normalize(prototypes).T / tau, dim=1) @ labels

    probs = snn(anchors)
    with torch.no_grad():
        t = snn(targets) ** (1.0 / T)
        t = t / t.sum(1, keepdim=True)
        if use_sinkhorn:
            t = sinkhorn_scaling(t)
        t = t.repeat(num_views, 1)
    ce = torch.mean(torch.sum(torch.log(probs ** (-t)), dim=1))
    rloss = torch.zeros((), dtype=anchors.dtype)
    if me_max:
        avg = probs.mean(0)
        rloss = -torch.sum(torch.log(avg ** (-avg))) + math.log(float(len(avg)))
    sloss = torch.zeros((), dtype=anchors.dtype)
    if use_entropy:
        sloss = torch.mean(torch.sum(torch.log(probs ** (-probs)), dim=1))
    return ce, rloss, sloss


def sinkhorn_scaling(P, num_itr=3):
    """Sinkhorn-Knopp as diagonal scalings u (samples) and v (prototypes) of the (B, K) matrix, never dividing the
    matrix itself: Q = diag(u) P diag(v), prototype marginals -> 1/K, sample marginals -> 1/B, then times B."""
    B, K = P.shape
    P = P / P.sum()
    u = torch.ones(B, dtype=P.dtype)
    v = torch.ones(K, dtype=P.dtype)
    for _ in range(num_itr):
        v = (1.0 / K) / (u @ P) * 1.0  # prototype sums (over samples) of diag(u) P diag(v) become 1/K
        u = (1.0 / B) / (P @ v)  # sample sums become 1/B
    return B * u[:, None] * P * v[None, :]


def make_inputs(B, num_views, K, D, dtype=torch.float64, scale=1.0, device="cpu"):
    anchors = scale * torch.randn(num_views * B, D, dtype=dtype)
    targets = scale * torch.randn(B, D, dtype=dtype)
    prototypes = scale * torch.randn(K, D, dtype=dtype)
    return anchors.to(device), targets.to(device), prototypes.to(device)


def smoothed_labels(K, smoothing, dtype=torch.float64):
    """The official ``one_hot(range(K), K)`` with label smoothing."""
    off = smoothing / K
    return torch.full((K, K), off, dtype=dtype).fill_diagonal_(1.0 - smoothing + off)


# (B, num_views, K, D)
SHAPES = [(4, 3, 16, 8), (3, 1, 10, 5), (2, 11, 33, 12), (5, 2, 7, 3)]
FLAGS = [(True, False), (False, False), (True, True), (False, True)]  # (me_max, use_entropy)


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: f"memax{int(f[0])}-ent{int(f[1])}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_official_arithmetic(shape, flags):
    B, V, K, D = shape
    me_max, use_entropy = flags
    anchors, targets, prototypes = make_inputs(B, V, K, D)
    ours = reference.msn_loss(anchors, targets, prototypes, None, V, 0.1, 0.25, me_max, use_entropy)
    theirs = official_style(anchors, targets, prototypes, None, V, 0.1, 0.25, me_max, use_entropy)
    for a, b in zip(ours, theirs):
        assert a.shape == () and a.dtype == torch.float64
        assert_close(a, b)
    via_op = vitkernels.msn_loss(anchors, targets, prototypes, None, V, 0.1, 0.25, me_max, use_entropy,
                                 backend="reference")
    for a, b in zip(via_op, ours):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_reference_with_proto_labels(smoothing):
    B, V, K, D = 3, 2, 12, 6
    anchors, targets, prototypes = make_inputs(B, V, K, D)
    labels = smoothed_labels(K, smoothing)
    ours = reference.msn_loss(anchors, targets, prototypes, labels, V, 0.2, 0.3, True, True)
    theirs = official_style(anchors, targets, prototypes, labels, V, 0.2, 0.3, True, True)
    for a, b in zip(ours, theirs):
        assert_close(a, b)
    if smoothing == 0.0:  # one-hot labels are the identity
        for a, b in zip(ours, reference.msn_loss(anchors, targets, prototypes, None, V, 0.2, 0.3, True, True)):
            assert_close(a, b)


def test_reference_closed_forms():
    """sharpen(softmax(z), T) = softmax(z / T); me-max = log K - H(avg); entropy = mean of H(probs)."""
    B, V, K, D = 4, 3, 9, 5
    anchors, targets, prototypes = make_inputs(B, V, K, D)
    tau, T = 0.15, 0.3
    z = F.normalize(anchors) @ F.normalize(prototypes).T / tau
    zt = F.normalize(targets) @ F.normalize(prototypes).T / tau
    t = torch.softmax(zt / T, dim=1).repeat(V, 1)
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    avg = p.mean(0)
    ce, rloss, sloss = reference.msn_loss(anchors, targets, prototypes, None, V, tau, T, True, True)
    assert_close(ce, -(t * logp).sum(1).mean())
    assert_close(rloss, math.log(K) + (avg * avg.log()).sum())
    assert_close(sloss, torch.distributions.Categorical(probs=p).entropy().mean())
    assert_close(reference.sharpen(torch.softmax(zt, 1), T), torch.softmax(zt / T, 1))


def test_sinkhorn_matches_scaling_formulation():
    P = torch.softmax(torch.randn(6, 10, dtype=torch.float64) * 2, dim=1)
    before = P.clone()
    Q = reference.distributed_sinkhorn(P)
    assert_close(Q, sinkhorn_scaling(P))
    torch.testing.assert_close(P, before, rtol=0, atol=0)  # the input is left alone
    assert_close(Q.sum(1), torch.ones(6, dtype=torch.float64))  # every sample's assignment sums to 1


def test_reference_with_sinkhorn():
    B, V, K, D = 4, 2, 10, 6
    anchors, targets, prototypes = make_inputs(B, V, K, D)
    ours = reference.msn_loss(anchors, targets, prototypes, None, V, 0.1, 0.25, True, False, use_sinkhorn=True)
    theirs = official_style(anchors, targets, prototypes, None, V, 0.1, 0.25, True, False, use_sinkhorn=True)
    for a, b in zip(ours, theirs):
        assert_close(a, b)
    plain = reference.msn_loss(anchors, targets, prototypes, None, V, 0.1, 0.25, True, False)
    assert not torch.allclose(ours[0], plain[0])  # Sinkhorn changed the targets


# --- gradients ------------------------------------------------------------------------------------------------------

def analytic_logit_grad(anchors, targets, prototypes, V, tau, T, g_ce, g_r, g_s):
    """Gradient w.r.t. the anchor logits z = cos / tau of g_ce * ce + g_r * rloss + g_s * sloss:
    (1/N) [g_ce (S_i p - t) + g_r p (log a - <p, log a>) - g_s p (log p + H_i)]."""
    z = F.normalize(anchors) @ F.normalize(prototypes).T / tau
    t = torch.softmax(F.normalize(targets) @ F.normalize(prototypes).T / (tau * T), dim=1).repeat(V, 1)
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    N = z.shape[0]
    loga = p.mean(0).log()
    H = -(p * logp).sum(1, keepdim=True)
    S = t.sum(1, keepdim=True)
    grad = g_ce * (S * p - t) + g_r * p * (loga - (p * loga).sum(1, keepdim=True)) - g_s * p * (logp + H)
    return z, grad / N


def test_reference_logit_gradient_matches_analytic():
    B, V, K, D = 3, 4, 11, 6
    anchors, targets, prototypes = make_inputs(B, V, K, D)
    tau, T = 0.1, 0.25
    z, expected = analytic_logit_grad(anchors, targets, prototypes, V, tau, T, 1.0, 0.7, 0.3)
    # autograd through the reference, seen from the logits: d loss / d anchors = d z/d anchors^T grad
    anchors.requires_grad_(True)
    prototypes.requires_grad_(True)
    ce, rloss, sloss = reference.msn_loss(anchors, targets, prototypes, None, V, tau, T, True, True)
    grads = torch.autograd.grad(ce + 0.7 * rloss + 0.3 * sloss, (anchors, prototypes))
    zz = F.normalize(anchors) @ F.normalize(prototypes).T / tau
    via_logits = torch.autograd.grad(zz, (anchors, prototypes), expected)
    for a, b in zip(grads, via_logits):
        assert_close(a, b)


@pytest.mark.parametrize("flags", [(True, True, False), (True, False, True)], ids=["memax-ent", "memax-sinkhorn"])
def test_reference_gradcheck(flags):
    me_max, use_entropy, use_sinkhorn = flags
    """w.r.t. the anchors (the prototypes also move the no-grad targets, which finite differences would see; their
    gradient is checked against the analytic formula above)."""
    anchors, targets, prototypes = make_inputs(2, 2, 5, 3)
    anchors.requires_grad_(True)

    def f(a):
        ce, r, s = reference.msn_loss(a, targets, prototypes, None, 2, 0.3, 0.5, me_max, use_entropy, use_sinkhorn)
        return ce + r + 0.5 * s

    assert torch.autograd.gradcheck(f, (anchors,))


def test_targets_get_no_gradient():
    anchors, targets, prototypes = make_inputs(2, 2, 5, 3)
    targets.requires_grad_(True)
    anchors.requires_grad_(True)
    ce, r, _ = vitkernels.msn_loss(anchors, targets, prototypes, None, 2, backend="reference")
    (ce + r).backward()
    assert targets.grad is None and anchors.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_are_finite(dtype):
    """Huge representations (normalised away) and a tiny temperature (logits up to 1/tau = 200): the softmax
    underflows to 0 for most prototypes, where the official log(probs ** -targets) would give inf."""
    B, V, K, D = 4, 3, 40, 8
    anchors, targets, prototypes = make_inputs(B, V, K, D, dtype=dtype, scale=1e4)
    anchors.requires_grad_(True)
    prototypes.requires_grad_(True)
    ce, rloss, sloss = vitkernels.msn_loss(anchors, targets, prototypes, None, V, 0.005, 0.25, True, True,
                                           backend="reference")
    (ce + rloss + sloss).backward()
    for v in (ce, rloss, sloss, anchors.grad, prototypes.grad):
        assert torch.isfinite(v).all()
    # the float64 closed form agrees
    z = F.normalize(anchors.detach().double()) @ F.normalize(prototypes.detach().double()).T / 0.005
    t = torch.softmax(F.normalize(targets.double()) @ F.normalize(prototypes.detach().double()).T / 0.00125, 1)
    expected_ce = -(t.repeat(V, 1) * torch.log_softmax(z, 1)).sum(1).mean()
    assert_close(ce.double(), expected_ce, rtol=1e-4, atol=1e-4 * expected_ce.abs().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    anchors, targets, prototypes = make_inputs(3, 2, 9, 4, dtype=torch.float32)
    a = anchors.to(dtype).requires_grad_(True)
    terms = vitkernels.msn_loss(a, targets.to(dtype), prototypes.to(dtype), None, 2, backend="reference")
    assert all(t.dtype == torch.float32 for t in terms)
    terms[0].backward()
    assert a.grad.dtype == dtype
    expected = reference.msn_loss(a.detach().double(), targets.to(dtype).double(), prototypes.to(dtype).double(),
                                  None, 2)
    for x, y in zip(terms, expected):
        assert_close(x.double(), y, rtol=1e-5, atol=1e-5)


# --- modules --------------------------------------------------------------------------------------------------------

def test_module_defaults_are_official():
    m = vitkernels.MSNLoss()
    assert (m.num_views, m.tau, m.T, m.me_max, m.use_sinkhorn, m.use_entropy) == (1, 0.1, 0.25, True, False, False)
    assert (m.me_max_weight, m.ent_weight) == (1.0, 0.0)
    assert not list(m.parameters()) and not list(m.buffers())


@pytest.mark.parametrize("module_cls", [reference.MSNLoss, vitkernels.MSNLoss], ids=["reference", "fast"])
@pytest.mark.parametrize("kw", [dict(), dict(use_entropy=True, ent_weight=0.5, me_max_weight=2.0),
                                dict(me_max=False, use_sinkhorn=True)], ids=["defaults", "weights", "sinkhorn"])
def test_module_combines_terms_with_weights(module_cls, kw):
    B, V, K, D = 3, 4, 10, 6
    anchors, targets, prototypes = make_inputs(B, V, K, D)
    module = module_cls(num_views=V, **kw)
    loss = module(anchors, targets, prototypes)
    flags = dict(me_max=module.me_max, use_entropy=module.use_entropy, use_sinkhorn=module.use_sinkhorn)
    ce, r, s = official_style(anchors, targets, prototypes, None, V, 0.1, 0.25, **flags)
    assert_close(loss, ce + module.me_max_weight * r + module.ent_weight * s)
    # a per-step sharpening temperature, as the official annealed schedule
    ce2, r2, s2 = official_style(anchors, targets, prototypes, None, V, 0.1, 0.4, **flags)
    assert_close(module(anchors, targets, prototypes, T=0.4), ce2 + module.me_max_weight * r2 + module.ent_weight * s2)


# --- bad inputs ---------------------------------------------------------------------------------------------------

def _good(**over):
    args = dict(anchor_views=torch.randn(6, 4), target_views=torch.randn(3, 4), prototypes=torch.randn(5, 4),
                proto_labels=None, num_views=2, tau=0.1, T=0.25, me_max=True, use_entropy=False, use_sinkhorn=False)
    args.update(over)
    return args


BAD_INPUTS = [
    (dict(anchor_views=torch.randn(6)), ValueError, "anchor_views must have 2 dimensions"),
    (dict(anchor_views=torch.randn(7, 4)), ValueError, "anchor_views must have shape"),
    (dict(anchor_views=torch.randn(6, 3)), ValueError, "anchor_views must have shape"),
    (dict(anchor_views=torch.randn(6, 4).long()), TypeError, "anchor_views must have dtype"),
    (dict(target_views=torch.randn(3, 5)), ValueError, "target_views must have D = 4"),
    (dict(target_views=torch.randn(0, 4), anchor_views=torch.randn(0, 4)), ValueError, "target_views must have at"),
    (dict(target_views=torch.randn(3, 4).double()), TypeError, "target_views has dtype"),
    (dict(prototypes=torch.randn(5, 4, 1)), ValueError, "prototypes must have 2 dimensions"),
    (dict(prototypes=torch.randn(0, 4)), ValueError, "prototypes must have a non-empty"),
    (dict(proto_labels=torch.eye(4)), ValueError, "proto_labels must have shape"),
    (dict(proto_labels=torch.eye(5).double()), TypeError, "proto_labels has dtype"),
    (dict(proto_labels=torch.ones(5)), ValueError, "proto_labels must have 2 dimensions"),
    (dict(num_views=0), ValueError, "num_views must be >= 1"),
    (dict(num_views=3), ValueError, "anchor_views must have shape"),
    (dict(tau=0.0), ValueError, "tau must be > 0"),
    (dict(T=-1.0), ValueError, "T must be > 0"),
    (dict(me_max=1), TypeError, "me_max must be a bool"),
    (dict(use_entropy=None), TypeError, "use_entropy must be a bool"),
    (dict(use_sinkhorn="no"), TypeError, "use_sinkhorn must be a bool"),
]


@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        vitkernels.msn_loss(**_good(**over))


def test_bad_device_mix():
    device = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match="prototypes is on"):
        vitkernels.msn_loss(**_good(prototypes=torch.randn(5, 4, device=device)))


def test_backend_names():
    with pytest.raises(vitkernels.BackendUnavailableError, match="native"):
        vitkernels.msn_loss(**_good(), backend="native")


# === Triton kernels (CPU interpreter on tiny shapes; CUDA when present) ==========================================

from helpers import assert_close_scaled, reference_dtype, tol, triton_interpreter_or_cuda  # noqa: E402

# Triton runs on CUDA tensors where a GPU exists, else on CPU tensors under the interpreter (tiny shapes).
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# inductor (the default) on a GPU, where the ops are triton_ops it traces; aot_eager under the interpreter, whose
# launches need real data pointers
COMPILE_BACKEND = "inductor" if DEV == "cuda" else "aot_eager"

WEIGHTS = (1.0, 0.7, 0.3)  # upstream gradients of (ce, rloss, sloss)


def run_terms(anchors, targets, prototypes, V, tau, T, flags, backend):
    me_max, use_entropy, use_sinkhorn = flags
    a = anchors.detach().clone().requires_grad_(True)
    p = prototypes.detach().clone().requires_grad_(True)
    terms = vitkernels.msn_loss(a, targets, p, None, V, tau, T, me_max, use_entropy, use_sinkhorn, backend=backend)
    total = sum(w * t for w, t in zip(WEIGHTS, terms))
    return terms, torch.autograd.grad(total, (a, p))


def check_triton(B, V, K, D, dtype, flags=(True, True, False), device=DEV, scale=1.0, tau=0.1, T=0.25,
                 zero_row=False):
    anchors, targets, prototypes = make_inputs(B, V, K, D, dtype=torch.float32, scale=scale)
    if zero_row:
        anchors[1] = 0.0  # F.normalize's clamped norm
    anchors, targets, prototypes = (x.to(device, dtype) for x in (anchors, targets, prototypes))
    terms, grads = run_terms(anchors, targets, prototypes, V, tau, T, flags, "triton")
    rdt = reference_dtype(dtype)
    ref_terms, ref_grads = run_terms(anchors.to(rdt), targets.to(rdt), prototypes.to(rdt), V, tau, T, flags,
                                     "reference")
    lt = tol(torch.float32)
    for t, r in zip(terms, ref_terms):
        assert t.dtype == torch.float32 and t.shape == () and torch.isfinite(t)
        torch.testing.assert_close(t.to(rdt), r, atol=lt["atol"] * max(1.0, r.abs().item()), rtol=lt["rtol"])
    for g, r, x in zip(grads, ref_grads, (anchors, prototypes)):
        assert g.dtype == dtype and g.shape == x.shape and torch.isfinite(g).all()
        assert_close_scaled(g, r, dtype)


# (B, num_views, K, D): row / class / feature tiles of the interpreter are 8-16 / 32 / 16 wide
TRITON_SHAPES = [(4, 3, 20, 10), (3, 1, 37, 5), (2, 11, 16, 17), (5, 2, 70, 24)]
TRITON_FLAGS = [(True, True, False), (True, False, False), (False, True, False), (False, False, False),
                (True, False, True)]


@pytest.mark.parametrize("flags", TRITON_FLAGS, ids=lambda f: f"memax{int(f[0])}-ent{int(f[1])}-sk{int(f[2])}")
def test_triton_flags(flags):
    triton_interpreter_or_cuda(DEV)
    check_triton(4, 3, 20, 10, torch.float32, flags)


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_shapes(shape):
    triton_interpreter_or_cuda(DEV)
    check_triton(*shape, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half(dtype):
    triton_interpreter_or_cuda(DEV)
    check_triton(3, 2, 24, 12, dtype)


def test_triton_extreme_inputs_are_finite():
    triton_interpreter_or_cuda(DEV)
    check_triton(4, 2, 40, 8, torch.float32, scale=1e4, tau=0.005)
    check_triton(3, 2, 20, 6, torch.float32, zero_row=True)


def test_triton_only_anchor_or_prototype_gradient():
    triton_interpreter_or_cuda(DEV)
    anchors, targets, prototypes = make_inputs(3, 2, 20, 6, dtype=torch.float32, device=DEV)
    for leaf in (anchors, prototypes):
        x = leaf.clone().requires_grad_(True)
        args = (x, targets, prototypes) if leaf is anchors else (anchors, targets, x)
        ce, r, _ = vitkernels.msn_loss(*args, None, 2, backend="triton")
        (g,) = torch.autograd.grad(ce + r, x)
        xr = x.detach().double().requires_grad_(True)
        args = (xr, targets.double(), prototypes.double()) if leaf is anchors else (
            anchors.double(), targets.double(), xr)
        ce, r, _ = vitkernels.msn_loss(*args, None, 2, backend="reference")
        (gr,) = torch.autograd.grad(ce + r, xr)
        assert_close_scaled(g, gr, torch.float32)


def test_triton_opcheck():
    triton_interpreter_or_cuda(DEV)
    anchors, targets, prototypes = make_inputs(3, 2, 20, 6, dtype=torch.float32, device=DEV)
    args = (anchors.requires_grad_(True), targets, prototypes.requires_grad_(True), 2, 0.1, 0.25)
    torch.library.opcheck(torch.ops.vitkernels.triton_msn_loss.default, (*args, True, True, False))
    torch.library.opcheck(torch.ops.vitkernels.triton_msn_loss.default, (*args, False, False, True))
    stats = torch.ops.vitkernels.triton_msn_loss(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args],
                                                 True, True, False)[1:]
    grad_terms = torch.tensor([1.0, 0.5, 0.2], device=DEV)
    torch.library.opcheck(torch.ops.vitkernels.triton_msn_loss_backward.default,
                          (grad_terms, anchors.detach(), prototypes.detach(), *stats, 0.1, True, True, True, False))


def test_triton_compile_fullgraph():
    triton_interpreter_or_cuda(DEV)
    anchors, targets, prototypes = make_inputs(3, 2, 20, 6, dtype=torch.float32, device=DEV)
    module = vitkernels.MSNLoss(num_views=2, use_entropy=True, ent_weight=0.5)

    def f(a, t, p):
        ce, r, s = vitkernels.msn_loss(a * 1.5, t, p, None, 2, backend="triton")
        return ce + r

    for fn in (f, lambda a, t, p: module(a, t, p)):
        leaves = [(anchors.clone().requires_grad_(True), prototypes.clone().requires_grad_(True)) for _ in range(2)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VITKERNELS_BACKEND", "triton")
            out = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)(leaves[0][0], targets, leaves[0][1])
            expected = fn(leaves[1][0], targets, leaves[1][1])
        torch.testing.assert_close(out, expected)
        for got, want in zip(torch.autograd.grad(out, leaves[0]), torch.autograd.grad(expected, leaves[1])):
            torch.testing.assert_close(got, want)


def test_triton_module_matches_reference_module(monkeypatch):
    triton_interpreter_or_cuda(DEV)
    monkeypatch.setenv("VITKERNELS_BACKEND", "triton")
    B, V, K, D = 3, 4, 24, 8
    anchors, targets, prototypes = make_inputs(B, V, K, D, dtype=torch.float32, device=DEV)
    kw = dict(num_views=V, use_entropy=True, ent_weight=0.5, use_sinkhorn=True)
    ours = vitkernels.MSNLoss(**kw)(anchors, targets, prototypes)
    theirs = reference.MSNLoss(**kw)(anchors.double(), targets.double(), prototypes.double())
    assert_close(ours.double(), theirs, torch.float32)


def test_triton_backend_refusals():
    triton_interpreter_or_cuda(DEV)
    with pytest.raises(vitkernels.BackendUnavailableError, match="proto_labels"):
        vitkernels.msn_loss(**{k: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                               for k, v in _good(proto_labels=torch.eye(5)).items()}, backend="triton")
    args = {k: (v.to(DEV, torch.float64) if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    with pytest.raises(vitkernels.BackendUnavailableError, match="float64"):
        vitkernels.msn_loss(**args, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_cuda_issue_size(dtype):
    """1,024 prototypes of dimension 256, 11 anchor views of B = 64 (the official ViT-S/16 config)."""
    check_triton(64, 11, 1024, 256, dtype, device="cuda")
    check_triton(64, 11, 1024, 256, dtype, (True, False, True), device="cuda")


@pytest.mark.cuda
def test_triton_cuda_odd_sizes_and_extremes():
    check_triton(5, 3, 1000, 200, torch.float32, device="cuda")
    check_triton(7, 2, 37, 1100, torch.float32, device="cuda")
    check_triton(16, 4, 4096, 64, torch.float32, device="cuda", scale=1e4, tau=0.005)
    check_triton(3, 2, 100, 33, torch.float32, device="cuda", zero_row=True)


# --- two processes (gloo): me-max averages and Sinkhorn sums run over all ranks --------------------------------------

def _msn_two_ranks(rank, init_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        B, V, K, D = 3, 2, 8, 5  # per rank
        # the same global data on both ranks; rank r holds targets rows r*B.. and its own anchors (view-major)
        anchors = torch.randn(2, V * B, D, dtype=torch.float64)
        targets = torch.randn(2, B, D, dtype=torch.float64)
        prototypes = torch.randn(K, D, dtype=torch.float64)
        a = anchors[rank].clone().requires_grad_(True)
        ce, rloss, _ = vitkernels.msn_loss(a, targets[rank], prototypes, None, V, 0.2, 0.3, True, False, True,
                                           backend="reference")
        # single-process expectation: Sinkhorn over all 2B targets, me-max over all 2VB anchors
        cos = lambda x: F.normalize(x) @ F.normalize(prototypes).T  # noqa: E731
        t_all = sinkhorn_scaling(torch.softmax(cos(targets.reshape(2 * B, D)) / (0.2 * 0.3), 1))
        t_local = t_all[rank * B:(rank + 1) * B].repeat(V, 1)
        expected_ce = -(t_local * torch.log_softmax(cos(anchors[rank]) / 0.2, 1)).sum(1).mean()
        avg = torch.softmax(cos(anchors.reshape(2 * V * B, D)) / 0.2, 1).mean(0)
        expected_rloss = (avg * avg.log()).sum() + math.log(K)
        torch.testing.assert_close(ce, expected_ce, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(rloss, expected_rloss, rtol=1e-10, atol=1e-10)
        (ce + rloss).backward()  # the official AllReduce passes the gradient through unchanged
        if not torch.isfinite(a.grad).all():
            raise AssertionError("non-finite gradient")
        from vitkernels.triton import triton_unavailable_reason

        if triton_unavailable_reason(a.device) is None:  # the fused kernels do not all-reduce: they refuse, naming why
            with pytest.raises(vitkernels.BackendUnavailableError, match="torch.distributed"):
                vitkernels.msn_loss(a.detach().float(), targets[rank].float(), prototypes.float(), None, V,
                                    backend="triton")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_terms_over_ranks(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    torch.multiprocessing.spawn(_msn_two_ranks, args=(str(tmp_path / "init"),), nprocs=2)
