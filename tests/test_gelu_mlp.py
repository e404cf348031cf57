"""gelu_mlp: native (blocked) vs reference (values and gradients, odd widths, every block split, every CPU
instruction set), the unblocked GEMM + bias_gelu sequence it replaces, the training ops (gelu_mlp_train and its
blocked backward: used when autograd records, deterministic), autograd (gradcheck, double backward), opcheck,
compile, auto's choice, argument errors."""
import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.ops import gelu_mlp as gelu_mlp_module
from vitkernels.ops.gelu_mlp import gelu_mlp
from vitkernels.reference.gelu_mlp import gelu_mlp as reference_gelu_mlp

from fused_ops_helpers import (CPU_ISAS, check_against_reference, check_split_across_threads, leaf, native_or_skip,
                               use_cpu_isa)
from helpers import OpCalls, assert_close

NATIVE_DTYPES = [torch.float32, torch.float64]
# (x shape, H, N): C a multiple of 16 / odd / one value, H and N odd or not, one row, many rows
SHAPES = [((2, 9, 24), 40, 24), ((3, 37), 19, 5), ((1, 4, 5, 16), 64, 16), ((7, 1), 3, 1), ((50, 8), 32, 8)]


def make_inputs(shape, hidden, out, approximate, biases=(True, True)):
    def make(dtype):
        gen = torch.Generator().manual_seed(0)
        C = shape[-1]
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        w1 = torch.randn(hidden, C, generator=gen, dtype=torch.float64) / C ** 0.5
        b1 = torch.randn(hidden, generator=gen, dtype=torch.float64)
        w2 = torch.randn(out, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5
        b2 = torch.randn(out, generator=gen, dtype=torch.float64)
        return (leaf(x, dtype), leaf(w1, dtype), leaf(b1, dtype) if biases[0] else None, leaf(w2, dtype),
                leaf(b2, dtype) if biases[1] else None, approximate)
    return make


@pytest.mark.parametrize("block_rows", [0, 1, 4])  # 0: one block here; 1 and 4: many, 4 with a remainder
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape, hidden, out", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
def test_native_matches_reference(shape, hidden, out, dtype, approximate, block_rows):
    native_or_skip("gelu_mlp")
    check_against_reference(
        lambda x, w1, b1, w2, b2, a: gelu_mlp(x, w1, b1, w2, b2, a, block_rows=block_rows, backend="native"),
        reference_gelu_mlp, make_inputs(shape, hidden, out, approximate), dtype)


@pytest.mark.parametrize("biases", [(False, True), (True, False), (False, False)], ids=str)
def test_without_biases(biases):
    native_or_skip("gelu_mlp")
    check_against_reference(
        lambda x, w1, b1, w2, b2, a: gelu_mlp(x, w1, b1, w2, b2, a, block_rows=3, backend="native"),
        reference_gelu_mlp, make_inputs((2, 7, 12), 20, 6, "none", biases), torch.float32)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set(isa, monkeypatch):
    native_or_skip("gelu_mlp")
    use_cpu_isa(monkeypatch, isa)
    for approximate in ("none", "tanh"):
        check_against_reference(
            lambda x, w1, b1, w2, b2, a: gelu_mlp(x, w1, b1, w2, b2, a, block_rows=5, backend="native"),
            reference_gelu_mlp, make_inputs((23, 20), 53, 20, approximate), torch.float32)


def test_matches_the_unblocked_sequence_it_replaces():
    """The Swin block's unblocked MLP (fc1 as a plain GEMM, bias_gelu, fc2 with its bias): each output row is the
    same GEMM arithmetic, up to the GEMM library's own row blocking."""
    native_or_skip("gelu_mlp")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 20, 20, 96, generator=gen)
    w1, b1 = torch.randn(384, 96, generator=gen) * 0.05, torch.randn(384, generator=gen) * 0.05
    w2, b2 = torch.randn(96, 384, generator=gen) * 0.05, torch.randn(96, generator=gen) * 0.05
    expected = F.linear(torch.ops.vitkernels.bias_gelu(F.linear(x, w1), b1, "none"), w2, b2)
    for block_rows in (0, 64, 100):
        out = gelu_mlp(x, w1, b1, w2, b2, block_rows=block_rows, backend="native")
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_non_contiguous_input():
    native_or_skip("gelu_mlp")
    x = torch.randn(6, 5, 16).transpose(0, 1)
    w1, b1, w2, b2 = torch.randn(24, 16), torch.randn(24), torch.randn(16, 24), torch.randn(16)
    assert_close(gelu_mlp(x, w1, b1, w2, b2, block_rows=4, backend="native"), reference_gelu_mlp(x, w1, b1, w2, b2))


def test_empty_rows_and_zero_width():
    native_or_skip("gelu_mlp")
    w1, b1, w2, b2 = torch.randn(8, 4), torch.randn(8), torch.randn(3, 8), torch.randn(3)
    out = gelu_mlp(torch.randn(0, 5, 4), w1, b1, w2, b2, backend="native")
    assert out.shape == (0, 5, 3)
    x = torch.randn(3, 0)  # C = 0: fc1 gives its bias alone
    w1 = torch.randn(8, 0)
    assert_close(gelu_mlp(x, w1, b1, w2, b2, backend="native"), reference_gelu_mlp(x, w1, b1, w2, b2))


def test_gradcheck_and_double_backward_float64():
    """The backward recomputes the hidden activation with differentiable ATen ops: second order works too."""
    native_or_skip("gelu_mlp")
    gen = torch.Generator().manual_seed(3)
    args = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in [(3, 4, 5), (7, 5), (7,), (4, 7), (4,)]]
    for approximate in ("none", "tanh"):
        fn = lambda x, w1, b1, w2, b2: gelu_mlp(x, w1, b1, w2, b2, approximate, block_rows=5,  # noqa: E731
                                                backend="native")
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_training_runs_the_blocked_backward_deterministically():
    native_or_skip("gelu_mlp")
    x, w1, b1, w2, b2, _ = make_inputs((3, 50, 24), 96, 24, "none")(torch.float32)
    g = torch.randn(3, 50, 24)

    def grads():
        with OpCalls() as calls:
            out = gelu_mlp(x, w1, b1, w2, b2, block_rows=7, backend="native")
            result = torch.autograd.grad(out, (x, w1, b1, w2, b2), g)
        assert "vitkernels::gelu_mlp_train" in calls.names and "vitkernels::gelu_mlp_backward" in calls.names
        return (out,) + result

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with torch.no_grad(), OpCalls() as calls:
        out = gelu_mlp(x, w1, b1, w2, b2, block_rows=7, backend="native")
    assert "vitkernels::gelu_mlp" in calls.names and "vitkernels::gelu_mlp_train" not in calls.names
    assert torch.equal(out, first[0])  # the same blocks: inference and training outputs are bitwise equal


def test_backward_of_an_unused_output_and_of_one_input():
    native_or_skip("gelu_mlp")
    x, w1, b1, w2, b2, _ = make_inputs((4, 10), 12, 6, "tanh")(torch.float64)
    out = gelu_mlp(x.detach(), w1, None, w2.detach(), None, "tanh", backend="native")
    (grad_w1,) = torch.autograd.grad(out.sum(), w1)
    (expected,) = torch.autograd.grad(reference_gelu_mlp(x.detach(), w1, None, w2.detach(), None, "tanh").sum(), w1)
    torch.testing.assert_close(grad_w1, expected)


def test_opcheck():
    native_or_skip("gelu_mlp")
    x = torch.randn(3, 5, 20, requires_grad=True)
    w1, b1 = torch.randn(30, 20, requires_grad=True), torch.randn(30, requires_grad=True)
    w2, b2 = torch.randn(20, 30, requires_grad=True), torch.randn(20, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkernels.gelu_mlp.default, (x, w1, b1, w2, b2, "none", 4))
    torch.library.opcheck(torch.ops.vitkernels.gelu_mlp.default, (x, w1, None, w2, None, "tanh", 0))
    torch.library.opcheck(torch.ops.vitkernels.gelu_mlp_train.default, (x, w1, b1, w2, b2, "none", 4))
    torch.library.opcheck(torch.ops.vitkernels.gelu_mlp_train.default, (x, w1, None, w2, None, "tanh", 0))
    _, pre = torch.ops.vitkernels.gelu_mlp_train(x.detach(), w1.detach(), b1.detach(), w2.detach(), None, "none", 4)
    torch.library.opcheck(torch.ops.vitkernels.gelu_mlp_backward.default,
                          (torch.randn(3, 5, 20), x.detach(), pre, w1.detach(), b1.detach(), w2.detach(), "none", 4))


def test_compiles_fullgraph():
    native_or_skip("gelu_mlp")
    x = torch.randn(2, 5, 32, requires_grad=True)
    w1, b1 = torch.randn(48, 32, requires_grad=True), torch.randn(48, requires_grad=True)
    w2, b2 = torch.randn(32, 48, requires_grad=True), torch.randn(32, requires_grad=True)
    fn = torch.compile(lambda *a: gelu_mlp(*a, block_rows=3, backend="native") * 2, backend="aot_eager",
                       fullgraph=True)
    out = fn(x, w1, b1, w2, b2)
    out.sum().backward()
    assert_close(out, 2 * reference_gelu_mlp(x, w1, b1, w2, b2))
    assert all(t.grad is not None for t in (x, w1, b1, w2, b2))


def test_auto_takes_native_only_where_blocking_pays():
    native_or_skip("gelu_mlp")
    cpu = torch.device("cpu")

    def chosen(dtype, weight_bytes, hidden_bytes):
        call = vitkernels.dispatch.Call(cpu, dtype, {"weight_bytes": weight_bytes, "hidden_bytes": hidden_bytes})
        return gelu_mlp_module.op.select(call).backend

    small_weights = 2 * 96 * 384 * 4  # Swin-T stage 1
    assert chosen(torch.float32, small_weights, 12544 * 384 * 4) == "native"  # batch 4: a 19 MB hidden
    assert chosen(torch.float32, small_weights, 1024 * 384 * 4) == "reference"  # small hidden
    assert chosen(torch.float32, 2 * 192 * 768 * 4, 3136 * 768 * 4 * 4) == "reference"  # stage 2's weights
    assert chosen(torch.bfloat16, small_weights, 12544 * 384 * 4) == "reference"  # not a native dtype
    reasons = gelu_mlp_module.op.reasons(vitkernels.dispatch.Call(cpu, torch.bfloat16))
    assert "dtype" in reasons["native"]
    with pytest.raises(vitkernels.dispatch.BackendUnavailableError, match="dtype"):
        gelu_mlp(torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16), None,
                 torch.randn(4, 8, dtype=torch.bfloat16), None, backend="native")


def test_layers_take_it_beside_aten_gemm_and_on_avx2_cpus(monkeypatch):
    """Layers' fused paths take the blocked op beside ATen's GEMM whatever the CPU, and beside oneDNN only on an
    AVX2-only CPU (vitkernels/ops/gelu_mlp.py layers_take_it); by default the process's own CPU GEMM and CPU."""
    from vitkernels.ops import linear as linear_op

    for capability in ("AVX2", "AVX512", "DEFAULT"):
        assert gelu_mlp_module.layers_take_it("aten", capability)
        assert gelu_mlp_module.layers_take_it("onednn", capability) == (capability == "AVX2")
    for library in ("aten", "onednn"):
        for avx2 in (False, True):
            monkeypatch.setattr(linear_op, "CPU_GEMM", library)
            monkeypatch.setattr(linear_op, "_AVX2_CPU", avx2)
            assert gelu_mlp_module.layers_take_it() == (library == "aten" or avx2)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((torch.randn(3, 4), torch.randn(8, 5), None, torch.randn(4, 8), None), {}, ValueError, "w1 must have shape"),
    ((torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(4, 7), None), {}, ValueError, "w2 must have shape"),
    ((torch.randn(3, 4), torch.randn(8, 4), torch.randn(7), torch.randn(4, 8), None), {}, ValueError,
     "b1 must have shape"),
    ((torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(4, 8), torch.randn(5)), {}, ValueError,
     "b2 must have shape"),
    ((torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(4, 8), None, "fast"), {}, ValueError,
     "approximate must be one of"),
    ((torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(4, 8), None), {"block_rows": -1}, ValueError,
     "block_rows"),
    ((torch.randn(3, 4), torch.randn(8, 4).double(), None, torch.randn(4, 8), None), {}, (TypeError, ValueError),
     "dtype"),
])
def test_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gelu_mlp(*args, **kwargs)


def test_native_op_checks_its_arguments():
    """The C++ entry point validates what it indexes (reachable without the Python checks)."""
    native_or_skip("gelu_mlp")
    op = torch.ops.vitkernels.gelu_mlp
    x, w1, b1, w2, b2 = torch.randn(3, 4), torch.randn(8, 4), torch.randn(8), torch.randn(5, 8), torch.randn(5)
    cases = [
        ((x, torch.randn(8, 3), b1, w2, b2, "none", 0), "w1 must be"),
        ((x, w1, b1, torch.randn(5, 7), b2, "none", 0), "w2 must be"),
        ((x, w1, torch.randn(9), w2, b2, "none", 0), "b1 must be"),
        ((x, w1, b1, w2, torch.randn(4), "none", 0), "b2 must be"),
        ((x, w1, b1.double(), w2, b2, "none", 0), "b1 must be Float"),
        ((x, w1, b1, w2.double(), b2, "none", 0), "w2 must be Float"),
        ((x.int(), w1, b1, w2, b2, "none", 0), "x must be a float32 or float64"),
        ((x, w1, b1, w2, b2, "erf", 0), "approximate must be"),
        ((x, w1, b1, w2, b2, "none", -2), "block_rows must be"),
        ((torch.randn(()), w1, b1, w2, b2, "none", 0), "x must be"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    _, pre = torch.ops.vitkernels.gelu_mlp_train(x, w1, b1, w2, b2, "none", 0)
    backward = torch.ops.vitkernels.gelu_mlp_backward
    g = torch.randn(3, 5)
    backward_cases = [
        ((torch.randn(3, 4), x, pre, w1, b1, w2, "none", 0), "grad must be"),
        ((g.double(), x, pre, w1, b1, w2, "none", 0), "grad must be"),
        ((g, x, pre[:2], w1, b1, w2, "none", 0), "pre must be"),
        ((g, x, pre.double(), w1, b1, w2, "none", 0), "pre must be"),
        ((g, x, pre, w1, b1, torch.randn(5, 7), "none", 0), "w2 must be"),
        ((g, x, pre, w1, b1, w2, "none", -1), "block_rows must be"),
    ]
    for args, match in backward_cases:
        with pytest.raises(RuntimeError, match=match):
            backward(*args)


def test_reference_backend_on_request():
    x, w1, w2 = torch.randn(2, 8), torch.randn(16, 8), torch.randn(8, 16)
    assert torch.equal(gelu_mlp(x, w1, None, w2, None, backend="reference"), reference_gelu_mlp(x, w1, None, w2, None))


# --- gelu_mlp_eager: the unblocked MLP on vitkernels' own GEMM, the GELU in its epilogues (float32, CPU, eager) -----

def eager_or_skip():
    native_or_skip("gelu_mlp")
    if not hasattr(torch.ops.vitkernels, "gelu_mlp_eager"):
        pytest.skip("vitkernels._C has no gelu_mlp_eager")


def own_or_skip():
    native_or_skip("gelu_mlp")
    if not hasattr(torch.ops.vitkernels, "gelu_mlp_own"):
        pytest.skip("vitkernels._C has no gelu_mlp_own")


def eager(x, w1, b1, w2, b2, approximate):
    return torch.ops.vitkernels.gelu_mlp_eager(x, w1, b1, w2, b2, approximate)


def float32_inputs(shape, hidden, out, approximate, biases=(True, True), grads=("x", "w1", "b1", "w2", "b2")):
    """make_inputs' draws rounded to float32, as float32 leaves (those named in ``grads`` requiring grad) and, for the
    reference, the same values in float64 (every one requiring grad)."""
    *tensors, _ = make_inputs(shape, hidden, out, approximate, biases)(torch.float32)
    names = ("x", "w1", "b1", "w2", "b2")
    ours = [None if t is None else t.detach().requires_grad_(n in grads) for n, t in zip(names, tensors)]
    ref = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    return ours + [approximate], ref + [approximate]


def assert_close_to_scale(got, want, rel=1e-5, msg=None):
    """float32 ``got`` vs float64 ``want``: within ``rel`` of want's largest magnitude (at least 1), elementwise."""
    assert got.dtype == torch.float32 and got.shape == want.shape, msg
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rel, atol=rel * scale, msg=msg)


def own(x, w1, b1, w2, b2, approximate):
    """gelu_mlp_own (the eager op's forward and backward as plain ops, for torch.compile), keeping the
    pre-activation where a gradient is required, as vitkernels.ops.gelu_mlp.own_gemm_mlp calls it."""
    keep_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    return torch.ops.vitkernels.gelu_mlp_own(x, w1, b1, w2, b2, approximate, keep_pre)[0]


def check_eager_against_reference(ours, ref, seed=2, fn=eager):
    """Output and the gradients of the inputs that require grad (the others: None) against the float64 reference
    on the same values, for a random output gradient; ``fn``: gelu_mlp_eager (default) or gelu_mlp_own."""
    out = fn(*ours)
    want = reference_gelu_mlp(*ref)
    assert_close_to_scale(out, want, msg="output")
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    out.backward(g)
    want.backward(g.double())
    for name, t, r in zip(("x", "w1", "b1", "w2", "b2"), ours, ref):
        if t is None:
            continue
        if t.requires_grad:
            assert t.grad is not None, name
            assert_close_to_scale(t.grad, r.grad, msg=f"grad of {name}")
        else:
            assert t.grad is None, name
    return out


# (x shape, H, N) for the own GEMM's blocking (register tile 6 x 16 on AVX2, K in passes of <= 384, N in blocks of
# <= 2048, a half-width tile for an 8-column panel, rows split between threads past 2^18 multiply-adds)
EAGER_SHAPES = [
    ((1, 20), 40, 16),       # one row
    ((7, 20), 33, 8),        # M = 6 + 1; H ragged (two tiles and a column); N one half-width tile
    ((8, 12), 8, 70),        # H one half-width tile (fc1's GELU and the backward's grad epilogue); N ragged
    ((2, 3, 24), 70, 33),    # leading dims
    ((50, 400), 70, 33),     # C > 384: fc1's K in two passes (GELU on the last); fc1 split between threads
    ((50, 24), 70, 400),     # N > 384: g W2's K in two passes (grad epilogue on the last), b1's sums per thread
    ((13, 5), 2100, 8),      # H > 2048: fc1 and g W2 in two column blocks (side matrix, b1's sums), fc2's K 6 passes
    ((0, 16), 32, 16),       # M = 0
    ((2, 0, 16), 24, 8),     # M = 0 with leading dims
]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape, hidden, out", EAGER_SHAPES, ids=str)
def test_eager_matches_reference(shape, hidden, out, approximate):
    eager_or_skip()
    ours, ref = float32_inputs(shape, hidden, out, approximate)
    y = check_eager_against_reference(ours, ref)
    assert y.shape == (*shape[:-1], out)


@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False), (False, False)], ids=str)
def test_eager_with_and_without_biases(biases):
    eager_or_skip()
    for approximate in ("none", "tanh"):
        check_eager_against_reference(*float32_inputs((13, 40), 33, 24, approximate, biases))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_eager_every_instruction_set(isa, monkeypatch):
    eager_or_skip()
    use_cpu_isa(monkeypatch, isa)
    check_eager_against_reference(*float32_inputs((13, 400), 40, 24, "tanh"))
    check_eager_against_reference(*float32_inputs((9, 20), 2100, 8, "none"))


@pytest.mark.parametrize("shape, hidden, out", EAGER_SHAPES, ids=str)
def test_eager_inference_is_bitwise_the_training_forward(shape, hidden, out):
    """Without autograd the op runs its forward alone (no pre-activation kept): the same tiles, the same numbers."""
    eager_or_skip()
    for approximate in ("none", "tanh"):
        ours, _ = float32_inputs(shape, hidden, out, approximate)
        trained = eager(*ours)
        assert trained.requires_grad and "EagerGeluMlp" in trained.grad_fn.name()
        with torch.no_grad():
            inferred = eager(*ours)
        assert not inferred.requires_grad and torch.equal(inferred, trained.detach())
        with torch.inference_mode():
            assert torch.equal(eager(*ours), inferred)
        plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in ours]  # nothing requires grad
        untracked = eager(*plain)
        assert not untracked.requires_grad and torch.equal(untracked, inferred)


@pytest.mark.parametrize("grads, biases", [
    (("x",), (True, True)),
    (("w1", "w2"), (True, True)),
    (("b1",), (True, True)),
    (("w2",), (False, True)),   # no b1: w2 is the op's third tensor input (autograd edge 2)
    (("b2",), (False, True)),   # no b1: b2 is edge 3
    (("x", "b2"), (True, True)),
], ids=str)
def test_eager_some_inputs_requiring_grad(grads, biases):
    eager_or_skip()
    for approximate in ("none", "tanh"):
        check_eager_against_reference(*float32_inputs((2, 7, 20), 33, 24, approximate, biases, grads))


def test_eager_non_contiguous_operands():
    """The own GEMM reads x, w1 and w2 in place, any strides; the output gradient of a sum is an expanded tensor."""
    eager_or_skip()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 3, 7, generator=gen).transpose(0, 2)  # (7, 3, 20)
    w1 = torch.randn(20, 33, generator=gen).t() / 20 ** 0.5  # (33, 20) transposed
    w2 = torch.randn(24, 66, generator=gen)[:, ::2] / 33 ** 0.5  # (24, 33), column stride 2
    b1, b2 = torch.randn(66, generator=gen)[::2], torch.randn(24, generator=gen)
    ours = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    ref = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    out, want = eager(*ours, "none"), reference_gelu_mlp(*ref, "none")
    assert_close_to_scale(out, want)
    out.sum().backward()
    want.sum().backward()
    for t, r in zip(ours, ref):
        assert_close_to_scale(t.grad, r.grad)


def test_eager_rows_split_between_threads():
    """Past 2^18 multiply-adds the own GEMM splits C's rows between the threads: every output row and the gradients
    of x, w1 and w2 are one thread's numbers, bitwise; b1's gradient (column sums per thread's rows, added in
    double) within float rounding."""
    eager_or_skip()
    check_split_across_threads(eager, lambda dtype: float32_inputs((60, 400), 70, 400, "tanh")[0])


@pytest.mark.parametrize("op", ["eager", "own"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_eager_double_backward(approximate, op):
    """Under create_graph the backward is differentiable ATen ops: the gradient of (grad_x * v).sum() with respect
    to x, w1, b1 and w2 is the reference's (float64 on the same values); gelu_mlp_eager and gelu_mlp_own."""
    own_or_skip() if op == "own" else eager_or_skip()
    ours, ref = float32_inputs((2, 7, 20), 33, 24, approximate)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(2, 7, 24, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 7, 20, generator=gen, dtype=torch.float64)
    results = []
    for fn, args, dtype in ((eager if op == "eager" else own, ours, torch.float32),
                            (reference_gelu_mlp, ref, torch.float64)):
        x, w1, b1, w2, _, _ = args
        (grad_x,) = torch.autograd.grad(fn(*args), x, g.to(dtype), create_graph=True)
        assert grad_x.requires_grad
        second = torch.autograd.grad((grad_x * v.to(dtype)).sum(), (x, w1, b1, w2))
        results.append((grad_x.detach(), *second))
    for name, got, want in zip(("grad_x", "x", "w1", "b1", "w2"), *results):
        assert_close_to_scale(got, want, rel=1e-4, msg=name)


def test_eager_refuses_bad_arguments():
    """check_mlp_args (csrc/cpu/gelu_mlp.cpp) names the argument; the op is float32 only."""
    eager_or_skip()
    x, w1, b1, w2, b2 = torch.randn(3, 4), torch.randn(8, 4), torch.randn(8), torch.randn(5, 8), torch.randn(5)
    cases = [
        ((x.double(), w1.double(), b1.double(), w2.double(), b2.double(), "none"), "x must be float32"),
        ((torch.randn(()), w1, b1, w2, b2, "none"), "x must be a float32 or float64 \\(\\.\\.\\., C\\)"),
        ((x.int(), w1, b1, w2, b2, "none"), "x must be a float32 or float64"),
        ((x, torch.randn(8, 5), b1, w2, b2, "none"), "gelu_mlp_eager: w1 must be \\(H, 4\\)"),
        ((x, torch.randn(8), b1, w2, b2, "none"), "gelu_mlp_eager: w1 must be \\(H, 4\\)"),
        ((x, w1, b1, torch.randn(5, 7), b2, "none"), "gelu_mlp_eager: w2 must be \\(N, 8\\)"),
        ((x, w1, b1, torch.randn(5, 8, 1), b2, "none"), "gelu_mlp_eager: w2 must be \\(N, 8\\)"),
        ((x, w1, torch.randn(9), w2, b2, "none"), "gelu_mlp_eager: b1 must be \\[8\\]"),
        ((x, w1, torch.randn(1, 8), w2, b2, "none"), "gelu_mlp_eager: b1 must be \\[8\\]"),
        ((x, w1, b1, w2, torch.randn(4), "none"), "gelu_mlp_eager: b2 must be \\[5\\]"),
        ((x, w1, b1.double(), w2, b2, "none"), "gelu_mlp_eager: b1 must be Float like x"),
        ((x, w1, b1, w2.double(), b2, "none"), "gelu_mlp_eager: w2 must be Float like x"),
        ((x, w1, b1, w2, b2, "erf"), "gelu_mlp_eager: approximate must be 'none' or 'tanh', got 'erf'"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            eager(*args)
        with pytest.raises(RuntimeError, match=match):  # the same checks where autograd records
            eager(*[t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                    for t in args])


# --- gelu_mlp_own / gelu_mlp_own_grad_pre: gelu_mlp_eager's forward and GELU-backward GEMM as plain ops, for
# torch.compile (fakes and autograd in vitkernels/ops/gelu_mlp.py) ------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape, hidden, out", EAGER_SHAPES, ids=str)
def test_own_matches_reference_and_eager(shape, hidden, out, approximate):
    """The output and every gradient against the float64 reference over the own GEMM's blocking edges; the forward
    bitwise gelu_mlp_eager's (the same tiles), h and the pre-activation the reference's, the gradients within
    float rounding of gelu_mlp_eager's (the same GEMMs, called through vitkernels::cpu_gemm)."""
    own_or_skip()
    ours, ref = float32_inputs(shape, hidden, out, approximate)
    y = check_eager_against_reference(ours, ref, fn=own)
    x, w1, b1, w2, b2, _ = ours
    with torch.no_grad():
        y_keep, h, pre = torch.ops.vitkernels.gelu_mlp_own(x, w1, b1, w2, b2, approximate, True)
        want_pre = F.linear(ref[0].detach(), ref[1].detach(), ref[2].detach()).reshape(-1, hidden)
    assert torch.equal(y_keep, y.detach()) and torch.equal(y_keep, eager(*ours).detach())
    assert_close_to_scale(pre, want_pre, msg="pre")
    assert_close_to_scale(h, F.gelu(want_pre, approximate=approximate), msg="h")
    grads_own = [t.grad.clone() for t in ours[:5]]
    for t in ours[:5]:
        t.grad = None
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    eager(*ours).backward(g)
    for name, a, t in zip(("x", "w1", "b1", "w2", "b2"), grads_own, ours[:5]):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("grads, biases", [
    (("x",), (True, True)),
    (("w1", "w2"), (True, True)),
    (("b1",), (True, True)),
    (("w2",), (False, True)),
    (("w2",), (False, False)),
    (("x", "b2"), (True, False)),
], ids=str)
def test_own_some_inputs_requiring_grad(grads, biases):
    own_or_skip()
    for approximate in ("none", "tanh"):
        check_eager_against_reference(*float32_inputs((2, 7, 20), 33, 24, approximate, biases, grads), fn=own)


def test_own_without_keep_pre():
    """keep_pre=False (inference): the same output, an empty pre-activation, and a backward that raises instead of
    differentiating without it."""
    own_or_skip()
    ours, _ = float32_inputs((5, 12), 40, 16, "none")
    y_keep, _, pre = torch.ops.vitkernels.gelu_mlp_own(*ours, True)
    y, h, empty = torch.ops.vitkernels.gelu_mlp_own(*ours, False)
    assert pre.shape == (5, 40) and empty.shape == (0,) and h.shape == (5, 40)
    assert torch.equal(y, y_keep)
    with pytest.raises(RuntimeError, match="keep_pre=False"):
        y.sum().backward()


def test_own_opcheck():
    own_or_skip()
    for biases in ((True, True), (False, False)):
        ours, _ = float32_inputs((2, 5, 12), 40, 16, "tanh", biases)
        torch.library.opcheck(torch.ops.vitkernels.gelu_mlp_own.default, (*ours, True))
        torch.library.opcheck(torch.ops.vitkernels.gelu_mlp_own.default, (*ours, False),
                              test_utils=("test_schema", "test_faketensor"))
    _, _, pre = torch.ops.vitkernels.gelu_mlp_own(*[t.detach() if isinstance(t, torch.Tensor) else t for t in ours],
                                                  True)
    torch.library.opcheck(torch.ops.vitkernels.gelu_mlp_own_grad_pre.default,
                          (torch.randn(2, 5, 16), ours[3].detach(), pre, "tanh"))


def test_own_grad_pre_refuses_bad_arguments():
    """gelu_mlp_own_grad_pre checks every shape it indexes, naming the argument."""
    own_or_skip()
    op = torch.ops.vitkernels.gelu_mlp_own_grad_pre
    g, w2, pre = torch.randn(6, 5), torch.randn(5, 8), torch.randn(6, 8)
    cases = [
        ((g, w2, pre, "erf"), "approximate must be 'none' or 'tanh'"),
        ((g, w2, pre.t().contiguous().t(), "none"), "pre must be a contiguous float32 \\(M, H\\)"),
        ((g, w2, pre.double(), "none"), "pre must be a contiguous float32"),
        ((g, w2, pre[0], "none"), "pre must be a contiguous float32"),
        ((g, torch.randn(5, 7), pre, "none"), "w2 must be a float32 \\(N, 8\\)"),
        ((g, w2.double(), pre, "none"), "w2 must be a float32"),
        ((g, torch.randn(5), pre, "none"), "w2 must be a float32"),
        ((torch.randn(6, 4), w2, pre, "none"), "grad must be a float32 \\(\\.\\.\\., 5\\) tensor of 6 rows"),
        ((torch.randn(7, 5), w2, pre, "none"), "grad must be a float32 \\(\\.\\.\\., 5\\) tensor of 6 rows"),
        ((torch.randn(()), w2, pre, "none"), "grad must be a float32"),
        ((g.double(), w2, pre, "none"), "grad must be a float32"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match="gelu_mlp_own_grad_pre: " + match):
            op(*args)
    with pytest.raises(RuntimeError, match="gelu_mlp_own: x must be float32"):
        torch.ops.vitkernels.gelu_mlp_own(torch.randn(3, 4).double(), torch.randn(8, 4).double(), None,
                                          torch.randn(5, 8).double(), None, "none", True)
    with pytest.raises(RuntimeError, match="gelu_mlp_own: w2 must be \\(N, 8\\)"):
        torch.ops.vitkernels.gelu_mlp_own(torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(5, 7), None, "none",
                                          True)


def test_own_gemm_mlp_takes_gelu_mlp_own_under_torch_compile(monkeypatch):
    """Where the Linears run vitkernels' own GEMM (OWN_GEMM, oneDNN as the CPU GEMM: an AVX2-only AMD CPU),
    own_gemm_mlp runs gelu_mlp_eager in eager mode and gelu_mlp_own in a compiled graph (fullgraph), with the eager
    op's output and gradients; under autocast or in float64 neither (None: the caller's unfused sequence)."""
    own_or_skip()
    eager_or_skip()
    from helpers import compile_recording_graphs, linears_on_own_gemm, vitkernels_ops

    linears_on_own_gemm(monkeypatch)
    ours, _ = float32_inputs((2, 9, 32), 128, 32, "tanh")
    x, w1, b1, w2, b2, approximate = ours
    assert gelu_mlp_module.eager_takes_it(x, w1, b1, w2) and not gelu_mlp_module.compiled_takes_it(x, w1, b1, w2)

    def mlp(x, w1, b1, w2, b2):
        return gelu_mlp_module.own_gemm_mlp(x, w1, b1, w2, b2, approximate)

    compiled, graphs = compile_recording_graphs(mlp)
    for train in (False, True):
        with torch.set_grad_enabled(train):
            got, want = compiled(x, w1, b1, w2, b2), mlp(x, w1, b1, w2, b2)
        assert torch.equal(got, want) and got.requires_grad == train
        if train:
            g = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
            got_grads = torch.autograd.grad(got, ours[:5], g)
            want_grads = torch.autograd.grad(want, ours[:5], g)
            for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), got_grads, want_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert vitkernels_ops(graphs)["gelu_mlp_own"] == 2, vitkernels_ops(graphs)  # an inference and a training graph
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mlp(x, w1, b1, w2, b2) is None
    assert mlp(*[t.detach().double() for t in ours[:5]]) is None
