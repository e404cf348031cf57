"""DINO loss: reference vs independent formulations, gradients, extreme logits, centre EMA, modules, validation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.reference import dino_loss as reference

from helpers import assert_close


# --- independent formulations -------------------------------------------------------------------------------------

def pairs_cross_entropy(student, teacher, center, ncrops, student_temp, teacher_temp):
    """Sum of F.cross_entropy with probability targets over the cross-view pairs, divided by their number."""
    B = student.shape[0] // ncrops
    center = center.reshape(1, -1)
    losses = []
    for t in range(2):
        q = torch.softmax((teacher[t * B:(t + 1) * B] - center) / teacher_temp, dim=1)
        for v in range(ncrops):
            if v != t:
                losses.append(F.cross_entropy(student[v * B:(v + 1) * B] / student_temp, q))
    return torch.stack(losses).mean()


def collapsed(student, teacher, center, ncrops, student_temp, teacher_temp):
    """The pair sum collapsed to per-row terms: (1 / (n_pairs B)) sum_{v,b} [w_v lse_v[b] - <Q_v[b], s_v[b]>] with
    Q_v = sum of the teacher distributions of the other global views and w_v their number."""
    B, K = student.shape[0] // ncrops, student.shape[1]
    s = (student / student_temp).reshape(ncrops, B, K)
    q = torch.softmax((teacher - center.reshape(1, -1)) / teacher_temp, dim=1).reshape(2, B, K)
    other = torch.tensor([[float(t != v) for t in range(2)] for v in range(ncrops)], dtype=student.dtype,
                         device=student.device)  # (V, 2)
    Q = torch.einsum("vt,tbk->vbk", other, q)
    w = other.sum(1)
    per_row = w[:, None] * torch.logsumexp(s, dim=2) - (Q * s).sum(2)
    return per_row.sum() / (w.sum() * B)


def analytic_student_grad(student, teacher, center, ncrops, student_temp, teacher_temp):
    """d loss / d student = (w_v softmax(s_v) - Q_v) / (n_pairs B student_temp)."""
    B, K = student.shape[0] // ncrops, student.shape[1]
    s = (student / student_temp).reshape(ncrops, B, K)
    q = torch.softmax((teacher - center.reshape(1, -1)) / teacher_temp, dim=1).reshape(2, B, K)
    other = torch.tensor([[float(t != v) for t in range(2)] for v in range(ncrops)], dtype=student.dtype,
                         device=student.device)
    Q = torch.einsum("vt,tbk->vbk", other, q)
    w = other.sum(1)
    grad = w[:, None, None] * torch.softmax(s, dim=2) - Q
    return (grad / (w.sum() * B * student_temp)).reshape(ncrops * B, K)


def make_inputs(ncrops, B, K, dtype=torch.float64, scale=3.0, center_shape="1k", device="cpu"):
    student = scale * torch.randn(ncrops * B, K, dtype=dtype)
    teacher = scale * torch.randn(2 * B, K, dtype=dtype)
    center = torch.randn(1, K, dtype=dtype) if center_shape == "1k" else torch.randn(K, dtype=dtype)
    return student.to(device), teacher.to(device), center.to(device)


# (ncrops, B, K): 2 global + locals, odd sizes; ncrops 1 (one pair) and 2 (globals only)
SHAPES = [(10, 4, 65), (2, 3, 17), (1, 2, 9), (4, 1, 33), (6, 5, 128)]


@pytest.mark.parametrize("center_shape", ["1k", "k"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_independent_formulations(shape, center_shape):
    ncrops, B, K = shape
    student, teacher, center = make_inputs(ncrops, B, K, center_shape=center_shape)
    args = (student, teacher, center, ncrops, 0.1, 0.04)
    loss = reference.dino_loss(*args)
    assert loss.shape == () and loss.dtype == torch.float64
    assert_close(loss, pairs_cross_entropy(*args))
    assert_close(loss, collapsed(*args))
    assert_close(vitkernels.dino_loss(*args, backend="reference"), loss, rtol=0, atol=0)


def test_num_pairs():
    assert [reference.num_pairs(n) for n in (1, 2, 3, 10)] == [1, 2, 4, 18]


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_reference_student_gradient(shape):
    ncrops, B, K = shape
    student, teacher, center = make_inputs(ncrops, B, K)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = reference.dino_loss(student, teacher, center, ncrops, 0.2, 0.05)
    loss.backward()
    assert_close(student.grad, analytic_student_grad(student.detach(), teacher.detach(), center, ncrops, 0.2, 0.05))
    assert teacher.grad is None  # the teacher is detached, as the official code


def test_reference_gradcheck():
    student, teacher, center = make_inputs(3, 2, 7)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: reference.dino_loss(s, teacher, center, 3, 0.3, 0.07), (student,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_are_finite(dtype):
    ncrops, B, K = 4, 3, 50
    student = torch.where(torch.rand(ncrops * B, K) < 0.5, -1e4, 1e4).to(dtype) * torch.rand(ncrops * B, K, dtype=dtype)
    teacher = torch.where(torch.rand(2 * B, K) < 0.5, -1e4, 1e4).to(dtype)
    teacher[0, 3] = 3e4  # one dominating class
    center = 1e3 * torch.randn(K, dtype=dtype)
    student.requires_grad_(True)
    loss = vitkernels.dino_loss(student, teacher, center, ncrops, backend="reference")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    expected = collapsed(student.detach().double(), teacher.double(), center.double(), ncrops, 0.1, 0.04)
    assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    student, teacher, center = make_inputs(4, 3, 40, dtype=torch.float32)
    s, t = student.to(dtype).requires_grad_(True), teacher.to(dtype)
    loss = vitkernels.dino_loss(s, t, center, 4, backend="reference")
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == dtype
    expected = collapsed(s.detach().double(), t.double(), center.double(), 4, 0.1, 0.04)
    assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


# --- centre update ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.9, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("center_shape", ["1k", "k"])
def test_center_update(momentum, center_shape):
    _, teacher, center = make_inputs(1, 5, 23, center_shape=center_shape)
    before = (center.clone(), teacher.clone())
    new = vitkernels.dino_center_update(center, teacher, momentum, backend="reference")
    assert new.shape == center.shape
    # independent: EMA written with torch.lerp towards the per-column mean
    expected = torch.lerp(center.reshape(-1), teacher.mean(0), 1 - momentum).reshape(center.shape)
    assert_close(new, expected)
    torch.testing.assert_close(center, before[0], rtol=0, atol=0)
    torch.testing.assert_close(teacher, before[1], rtol=0, atol=0)


def test_center_update_dtype_promotion():
    teacher = torch.randn(4, 6, dtype=torch.float16)
    center = torch.randn(1, 6)
    new = vitkernels.dino_center_update(center, teacher, backend="reference")
    assert new.dtype == torch.float32
    assert_close(new, 0.9 * center + 0.1 * teacher.float().mean(0, keepdim=True), rtol=1e-3, atol=1e-3)


# --- modules --------------------------------------------------------------------------------------------------------

def official_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs):
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(nepochs - warmup_epochs) * teacher_temp))


@pytest.mark.parametrize("args", [(0.04, 0.07, 30, 100), (0.04, 0.04, 0, 10), (0.01, 0.09, 1, 3),
                                  (0.03, 0.07, 7, 7), (0.04, 0.06, 2, 5)])
def test_teacher_temp_schedule_matches_numpy(args):
    ours = reference.teacher_temp_schedule(*args)
    theirs = official_schedule(*args)
    assert len(ours) == len(theirs)
    assert all(a == b for a, b in zip(ours, theirs.tolist()))  # bit-exact


def test_teacher_temp_schedule_bad():
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        reference.teacher_temp_schedule(0.04, 0.07, 30, 10)


class OfficialStyleDINOLoss(torch.nn.Module):
    """The official module re-derived: loss over pairs with F.cross_entropy, then EMA of the teacher mean."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs):
        super().__init__()
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float64))
        self.schedule = official_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs)

    def forward(self, student, teacher, epoch):
        loss = pairs_cross_entropy(student, teacher, self.center, self.ncrops, 0.1, float(self.schedule[epoch]))
        self.center = 0.9 * self.center + 0.1 * teacher.detach().mean(0, keepdim=True)
        return loss


@pytest.mark.parametrize("module_cls", [reference.DINOLoss, vitkernels.DINOLoss], ids=["reference", "fast"])
def test_module_matches_official_style_over_steps(module_cls):
    ncrops, B, K = 5, 3, 31
    ours = module_cls(K, ncrops, 0.04, 0.07, 3, 6).double()
    theirs = OfficialStyleDINOLoss(K, ncrops, 0.04, 0.07, 3, 6)
    assert list(ours.state_dict()) == ["center"] and ours.center.shape == (1, K)
    assert ours.student_temp == 0.1 and ours.center_momentum == 0.9
    for epoch in range(6):
        student, teacher, _ = make_inputs(ncrops, B, K)
        student.requires_grad_(True)
        loss = ours(student, teacher, epoch)
        expected = theirs(student, teacher, epoch)
        assert_close(loss, expected)
        assert_close(ours.center, theirs.center)
        (g,) = torch.autograd.grad(loss, student)
        (ge,) = torch.autograd.grad(expected, student)
        assert_close(g, ge)
    with pytest.raises(IndexError):
        ours(student, teacher, 6)


def test_fast_module_keeps_center_buffer():
    loss_fn = vitkernels.DINOLoss(8, 2, 0.04, 0.04, 0, 2)
    center = loss_fn.center
    loss_fn(torch.randn(4, 8), torch.randn(4, 8) + 5.0, 0)
    assert loss_fn.center is center and center.dtype == torch.float32
    assert (center > 0).all()


# --- bad inputs ---------------------------------------------------------------------------------------------------

def _good(**over):
    args = dict(student_output=torch.randn(12, 10), teacher_output=torch.randn(6, 10), center=torch.zeros(1, 10),
                ncrops=4, student_temp=0.1, teacher_temp=0.04)
    args.update(over)
    return args


BAD_INPUTS = [
    (dict(student_output=torch.randn(12)), ValueError, "student_output must have 2 dimensions"),
    (dict(student_output=torch.randn(13, 10)), ValueError, "student_output must have ncrops"),
    (dict(student_output=torch.randn(12, 10).int()), TypeError, "student_output must have dtype"),
    (dict(student_output=[1.0]), TypeError, "student_output must be a torch.Tensor"),
    (dict(teacher_output=torch.randn(3, 10)), ValueError, "teacher_output must have shape"),
    (dict(teacher_output=torch.randn(6, 11)), ValueError, "teacher_output must have shape"),
    (dict(teacher_output=torch.randn(6, 10).double()), TypeError, "teacher_output has dtype"),
    (dict(center=torch.zeros(2, 10)), ValueError, "center must have shape"),
    (dict(center=torch.zeros(9)), ValueError, "center must have K = 10"),
    (dict(center=torch.zeros(1, 1, 10)), ValueError, "center must have 1 or 2 dimensions"),
    (dict(ncrops=0), ValueError, "ncrops must be >= 1"),
    (dict(ncrops=2.0), TypeError, "ncrops must be an int"),
    (dict(student_temp=0.0), ValueError, "student_temp must be > 0"),
    (dict(teacher_temp=-0.04), ValueError, "teacher_temp must be > 0"),
    (dict(teacher_temp="0.04"), TypeError, "teacher_temp must be a positive float"),
    (dict(student_output=torch.randn(12, 0), teacher_output=torch.randn(6, 0), center=torch.zeros(0)),
     ValueError, "student_output must have K >= 1"),
]


@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        vitkernels.dino_loss(**_good(**over))


@pytest.mark.parametrize("momentum,exc", [(-0.1, ValueError), (1.5, ValueError), (True, TypeError), ("0.9", TypeError)])
def test_bad_momentum(momentum, exc):
    with pytest.raises(exc, match="momentum"):
        vitkernels.dino_center_update(torch.zeros(1, 4), torch.randn(2, 4), momentum)


def test_bad_center_update_shapes():
    with pytest.raises(ValueError, match="center must have K = 4"):
        vitkernels.dino_center_update(torch.zeros(1, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="teacher_output must have 2 dimensions"):
        vitkernels.dino_center_update(torch.zeros(1, 4), torch.randn(4))
    with pytest.raises(ValueError, match="teacher_output must have at least one row"):
        vitkernels.dino_center_update(torch.zeros(1, 4), torch.randn(0, 4))


def test_bad_device_mix():
    if torch.cuda.is_available():
        other = torch.zeros(1, 10, device="cuda")
        match = "center is on"
    else:
        other = torch.zeros(1, 10, device="meta")
        match = "center is on meta"
    with pytest.raises(ValueError, match=match):
        vitkernels.dino_loss(**_good(center=other))
    with pytest.raises(ValueError, match="is on"):
        vitkernels.dino_center_update(other, torch.randn(6, 10))


def test_backend_names():
    with pytest.raises(vitkernels.BackendUnavailableError, match="native"):
        vitkernels.dino_loss(**_good(), backend="native")
    with pytest.raises(ValueError, match="backend"):
        vitkernels.dino_loss(**_good(), backend="gpu")


# === Triton kernels (CPU interpreter on tiny shapes; CUDA when present) ==========================================

from helpers import assert_close_scaled, reference_dtype, tol, triton_interpreter_or_cuda  # noqa: E402

# Triton runs on CUDA tensors where a GPU exists, else on CPU tensors under the interpreter (tiny shapes).
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# inductor (the default) on a GPU, where the ops are triton_ops it traces; aot_eager under the interpreter, whose
# launches need real data pointers
COMPILE_BACKEND = "inductor" if DEV == "cuda" else "aot_eager"


def check_triton(ncrops, B, K, dtype, device=DEV, scale=3.0, student_temp=0.1, teacher_temp=0.04,
                 center_shape="k", center_dtype=torch.float32, conditioning=None):
    """``conditioning``: a relative tolerance for the loss and (scaled by the largest gradient) the gradient, in
    place of the dtype's, for inputs so large that one ulp of the fp32 logits ``x / T`` changes the softmax."""
    student, teacher, center = make_inputs(ncrops, B, K, dtype=torch.float32, scale=scale, center_shape=center_shape)
    student, teacher = student.to(device, dtype), teacher.to(device, dtype)
    center = center.to(device, center_dtype)
    s = student.clone().requires_grad_(True)
    loss = vitkernels.dino_loss(s, teacher, center, ncrops, student_temp, teacher_temp, backend="triton")
    assert loss.dtype == torch.float32 and loss.shape == ()
    g = torch.rand((), device=device) + 0.5
    (grad,) = torch.autograd.grad(loss, s, g)
    rdt = reference_dtype(dtype)
    sr = student.to(rdt).requires_grad_(True)
    ref = reference.dino_loss(sr, teacher.to(rdt), center.to(rdt), ncrops, student_temp, teacher_temp)
    (ref_grad,) = torch.autograd.grad(ref, sr, g.to(rdt))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.dtype == dtype and grad.shape == student.shape
    if conditioning is not None:
        torch.testing.assert_close(loss.to(rdt), ref, atol=0, rtol=conditioning)
        torch.testing.assert_close(grad.to(rdt), ref_grad, atol=conditioning * ref_grad.abs().max().item(), rtol=0)
        return
    lt = tol(torch.float32)  # the loss is accumulated in fp32 whatever the input dtype
    torch.testing.assert_close(loss.to(rdt), ref, atol=lt["atol"] * max(1.0, ref.abs().item()), rtol=lt["rtol"])
    assert_close_scaled(grad, ref_grad, dtype)


# (ncrops, B, K): multi-tile / multi-chunk class dimensions (interpreter tiles are 64 classes), ncrops 1 and 2
TRITON_SHAPES = [(4, 3, 37), (10, 2, 150), (2, 3, 64), (1, 2, 9), (3, 1, 200)]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_fp32_forward_backward(shape):
    triton_interpreter_or_cuda(DEV)
    check_triton(*shape, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_forward_backward(dtype):
    triton_interpreter_or_cuda(DEV)
    check_triton(4, 2, 70, dtype, center_shape="1k")


def test_triton_temperatures_and_center_dtype():
    triton_interpreter_or_cuda(DEV)
    check_triton(3, 2, 33, torch.float32, student_temp=0.5, teacher_temp=0.07, center_dtype=torch.float64)


def test_triton_extreme_logits_are_finite():
    triton_interpreter_or_cuda(DEV)
    # logits ~1e4 / T ~ 1e5..1e6, where an fp32 ulp is 0.01..0.06: the rounding of x / T alone (which differs with
    # the order of operations and FMA contraction: GPU and interpreter differ) moves near-tied teacher probabilities
    # by percents, against log-probabilities of ~1e5. An H200 was 6e-4 from the fp64 reference (the interpreter
    # closer); 5e-3 is what fp32 can promise here, and finite values are the point of this test.
    check_triton(4, 2, 90, torch.float32, scale=1e4, conditioning=5e-3)
    # one dominating teacher class, all-negative huge student rows
    ncrops, B, K = 3, 2, 40
    student = -1e4 - 1e3 * torch.rand(ncrops * B, K, device=DEV)
    teacher = -1e4 * torch.rand(2 * B, K, device=DEV)
    teacher[:, 5] = 1e4
    center = torch.zeros(K, device=DEV)
    s = student.clone().requires_grad_(True)
    loss = vitkernels.dino_loss(s, teacher, center, ncrops, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    expected = collapsed(student.double(), teacher.double(), center.double(), ncrops, 0.1, 0.04)
    assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().item())


@pytest.mark.parametrize("block_k,chunk", [(8, 8), (8, 32), (16, 48)])
def test_triton_kernels_tilings(block_k, chunk):
    """The launchers with explicit small tiles: many chunks per row and several tiles per chunk are merged."""
    triton_interpreter_or_cuda(DEV)
    from vitkernels.triton import dino_loss as kernels

    ncrops, B, K = 4, 2, 77
    student, teacher, center = make_inputs(ncrops, B, K, dtype=torch.float32, center_shape="k", device=DEV)
    loss, student_lse, teacher_lse, center_copy = kernels.dino_loss_fwd(student, teacher, center, ncrops, 0.1, 0.04,
                                                                        block_k, chunk)
    torch.testing.assert_close(center_copy, center, rtol=0, atol=0)
    args64 = (student.double(), teacher.double(), center.double(), ncrops, 0.1, 0.04)
    assert_close(loss.double(), reference.dino_loss(*args64), torch.float32)
    assert_close(student_lse.double(), torch.logsumexp(student.double() / 0.1, 1), torch.float32)
    assert_close(teacher_lse.double(), torch.logsumexp((teacher.double() - center.double()) / 0.04, 1),
                 torch.float32)
    g = torch.tensor(0.75, device=DEV)
    grad = kernels.dino_loss_bwd(g, student, teacher, center_copy, student_lse, teacher_lse, ncrops, 0.1, 0.04,
                                 block_k, chunk)
    assert_close(grad.double(), 0.75 * analytic_student_grad(*args64), torch.float32)


@pytest.mark.parametrize("center_shape", ["1k", "k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_center_update(dtype, center_shape):
    triton_interpreter_or_cuda(DEV)
    _, teacher, center = make_inputs(1, 9, 150, dtype=torch.float32, center_shape=center_shape, device=DEV)
    teacher = teacher.to(dtype)
    new = vitkernels.dino_center_update(center, teacher, 0.8, backend="triton")
    expected = vitkernels.dino_center_update(center.double(), teacher.double(), 0.8, backend="reference")
    assert new.shape == center.shape and new.dtype == torch.float32
    assert_close(new, expected.float(), torch.float32)


def test_triton_opcheck():
    triton_interpreter_or_cuda(DEV)
    student, teacher, center = make_inputs(3, 2, 20, dtype=torch.float32, center_shape="k", device=DEV)
    forward_args = (student.requires_grad_(True), teacher, center, 3, 0.1, 0.04)
    torch.library.opcheck(torch.ops.vitkernels.triton_dino_loss.default, forward_args)
    _, student_lse, teacher_lse, center_copy = torch.ops.vitkernels.triton_dino_loss(student.detach(),
                                                                                     *forward_args[1:])
    grad = torch.tensor(1.0, device=DEV)
    torch.library.opcheck(torch.ops.vitkernels.triton_dino_loss_backward.default,
                          (grad, student.detach(), teacher, center_copy, student_lse, teacher_lse, 3, 0.1, 0.04))
    torch.library.opcheck(torch.ops.vitkernels.triton_dino_center_update.default, (center, teacher, 0.9))


def test_triton_compile_fullgraph():
    triton_interpreter_or_cuda(DEV)
    student, teacher, center = make_inputs(4, 2, 24, dtype=torch.float32, center_shape="1k", device=DEV)

    def f(s, t, c):
        loss = vitkernels.dino_loss(s * 2.0, t, c, 4, backend="triton")
        return loss, vitkernels.dino_center_update(c, t, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    (loss, new_center), (expected, expected_center) = compiled(s1, teacher, center), f(s2, teacher, center)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(new_center, expected_center)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_triton_module_fullgraph(monkeypatch):
    """The fast module (loss + in-place centre update) on the triton backend, compiled without graph breaks."""
    triton_interpreter_or_cuda(DEV)
    monkeypatch.setenv("VITKERNELS_BACKEND", "triton")
    ncrops, B, K = 4, 2, 24
    ours = vitkernels.DINOLoss(K, ncrops, 0.04, 0.07, 2, 4).to(DEV)
    theirs = reference.DINOLoss(K, ncrops, 0.04, 0.07, 2, 4).to(DEV)
    compiled = torch.compile(ours, fullgraph=True, backend=COMPILE_BACKEND)
    for epoch in range(3):
        student, teacher, _ = make_inputs(ncrops, B, K, dtype=torch.float32, device=DEV)
        s = student.clone().requires_grad_(True)
        loss = compiled(s, teacher, epoch)
        expected = theirs(student, teacher, epoch)
        assert_close(loss, expected, torch.float32)
        assert_close(ours.center, theirs.center, torch.float32)
        loss.backward()
        assert torch.isfinite(s.grad).all()


def test_triton_backend_refuses_float64():
    triton_interpreter_or_cuda(DEV)
    args = {k: (v.to(DEV, torch.float64) if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    with pytest.raises(vitkernels.BackendUnavailableError, match="float64"):
        vitkernels.dino_loss(**args, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_cuda_issue_size(dtype):
    """K = 65,536, 2 global + 8 local crops (B = 8 here to keep the float64 reference small)."""
    check_triton(10, 8, 65536, dtype, device="cuda")


@pytest.mark.cuda
def test_triton_cuda_odd_sizes_and_extremes():
    check_triton(6, 5, 1000, torch.float32, device="cuda")
    check_triton(1, 3, 7, torch.float32, device="cuda")
    check_triton(4, 16, 4099, torch.float32, device="cuda", scale=1e4)
    _, teacher, center = make_inputs(1, 64, 65536, dtype=torch.float32, center_shape="1k")
    new = vitkernels.dino_center_update(center.cuda(), teacher.cuda(), backend="triton")
    assert_close(new.cpu().double(), 0.9 * center.double() + 0.1 * teacher.double().mean(0, keepdim=True),
                 torch.float32)


# --- two processes (gloo): the centre's batch mean is taken over all ranks -----------------------------------------

def _center_update_two_ranks(rank, init_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        teacher = torch.randn(2, 6, 11, dtype=torch.float64)  # (ranks, rows per rank, K): the same on both ranks
        center = torch.randn(1, 11, dtype=torch.float64)
        new = vitkernels.dino_center_update(center, teacher[rank], 0.7, backend="reference")
        expected = 0.7 * center + 0.3 * teacher.reshape(12, 11).mean(0, keepdim=True)
        torch.testing.assert_close(new, expected, rtol=1e-12, atol=1e-12)
        if reference.world_size() != 2:
            raise AssertionError("world_size() should see both ranks")
        # the one-pass Triton kernel cannot all-reduce between its reduction and the EMA: it refuses, with the reason
        from vitkernels.triton import triton_unavailable_reason

        if triton_unavailable_reason(teacher.device) is None:
            try:
                vitkernels.dino_center_update(center.float(), teacher[rank].float(), 0.7, backend="triton")
            except vitkernels.BackendUnavailableError as exc:
                if "all-reduced" not in str(exc):
                    raise AssertionError(f"unexpected refusal: {exc}")
            else:
                raise AssertionError("the Triton centre update must refuse a multi-process run")
    finally:
        torch.distributed.destroy_process_group()


def test_center_update_all_reduces_over_ranks(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    torch.multiprocessing.spawn(_center_update_two_ranks, args=(str(tmp_path / "init"),), nprocs=2)
