"""vitkernels' own CPU GEMM (``vitkernels::cpu_gemm``, csrc/cpu/gemm.cpp) against float64: every blocking path
(ragged tiles, several K passes, several column blocks, the split over K), operand strides, bias, every instruction
set, thread counts; its autograd and opcheck; the Linear's eager path and the blocked MLP on it; the rule that
turns it on (vitkernels/ops/linear.py own_gemm_takes_it)."""
import pytest
import torch
import torch.nn.functional as F

from fused_ops_helpers import CPU_ISAS, use_cpu_isa
from helpers import OpCalls
from helpers import assert_close_scaled
from vitkernels import _native
from vitkernels.ops import linear as linear_op

pytestmark = pytest.mark.skipif(not (_native.is_loaded() and hasattr(torch.ops.vitkernels, "cpu_gemm")),
                                reason=_native.IMPORT_ERROR or "vitkernels._C has no cpu_gemm")

SHAPES = [  # (M, K, N): the paths of csrc/cpu/gemm.cpp
    (1, 1, 1),
    (5, 3, 7),          # one ragged tile
    (6, 16, 16),        # one whole AVX2 tile
    (7, 17, 33),        # ragged rows and columns
    (12, 20, 24),       # a last panel of one vector (AVX2: 16 + 8), straight into C; baseline: 8 + 8 + 8
    (13, 20, 48),       # AVX-512's half-width panel (32 + 16), AVX2's whole ones; ragged rows
    (12, 9, 12),        # baseline's half-width panel (8 + 4); AVX2 / AVX-512: a half-width one through scratch
    (13, 385, 33),      # two K passes (K > 384)
    (150, 40, 2100),    # two row blocks (> 144 rows) and two column blocks (N > 2048)
    (20, 1600, 24),     # split over K (K >= 1536, small C)
    (300, 1537, 40),    # split over K with ragged K shares, several K passes each
    (9, 0, 5),          # K = 0: bias or zeros
]
LAYOUTS = ["contiguous", "transposed", "strided"]


def operand(rows, cols, layout, gen):
    """A (rows, cols) float32 operand stored as ``layout``: contiguous, a transposed view of a (cols, rows) tensor,
    or every other column of a wider tensor (non-unit strides on both dims after a slice of rows too)."""
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=gen)
    if layout == "transposed":
        return torch.randn(cols, rows, generator=gen).t()
    return torch.randn(rows + 1, 2 * cols + 1, generator=gen)[1:, : 2 * cols : 2]


def expected64(a, b, bias):
    out = a.double() @ b.double()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("b_layout", LAYOUTS)
@pytest.mark.parametrize("a_layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_gemm_matches_float64(shape, a_layout, b_layout, bias):
    M, K, N = shape
    gen = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a, b = operand(M, K, a_layout, gen), operand(K, N, b_layout, gen)
    c = torch.randn(N, generator=gen) if bias else None
    out = torch.ops.vitkernels.cpu_gemm(a, b, c)
    assert out.shape == (M, N) and out.is_contiguous() and out.dtype == torch.float32
    assert_close_scaled(out, expected64(a, b, c), torch.float32)


@pytest.mark.parametrize("shape", [(0, 5, 4), (4, 5, 0), (0, 0, 0)], ids=str)
def test_native_gemm_empty_products(shape):
    M, K, N = shape
    out = torch.ops.vitkernels.cpu_gemm(torch.randn(M, K), torch.randn(K, N), torch.randn(N))
    assert out.shape == (M, N)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_native_gemm_every_instruction_set(isa, monkeypatch):
    """Each instruction set's tile (AVX-512: 6 x 32, AVX2: 6 x 16, baseline: 6 x 8; a CPU without one runs its best)
    on ragged, half-width, multi-pass and split-K shapes."""
    use_cpu_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(7)
    for M, K, N in [(7, 17, 33), (13, 385, 70), (20, 1600, 24), (12, 20, 24), (13, 20, 48), (12, 9, 12)]:
        a, b, c = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen).t(), torch.randn(N, generator=gen)
        assert_close_scaled(torch.ops.vitkernels.cpu_gemm(a, b, c), expected64(a, b, c), torch.float32)


def test_native_gemm_row_split_is_the_same_for_every_thread_count():
    """Split over C's rows, each row's sums run in the same order whatever the thread count: bitwise the same
    results on 1 and 2 threads (the split over K, for long K and small C, rounds per thread's share instead)."""
    gen = torch.Generator().manual_seed(3)
    a, b, c = torch.randn(300, 700, generator=gen), torch.randn(700, 90, generator=gen), torch.randn(90, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.vitkernels.cpu_gemm(a, b, c)
        torch.set_num_threads(2)
        two = torch.ops.vitkernels.cpu_gemm(a, b, c)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_native_gemm_inside_a_parallel_region_runs_on_the_calling_thread():
    """Called from the blocked MLP's tasks (a parallel region) the GEMM runs single-threaded: the MLP's blocks on
    its own GEMM match float64 (a nested region would oversubscribe, not miscompute; the check is the numbers)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 700, 24, generator=gen)
    w1, b1 = torch.randn(96, 24, generator=gen) / 5, torch.randn(96, generator=gen)
    w2, b2 = torch.randn(24, 96, generator=gen) / 10, torch.randn(24, generator=gen)
    out = torch.ops.vitkernels.gelu_mlp(x, w1, b1, w2, b2, "none", 64, True)
    want = F.linear(F.gelu(F.linear(x.double(), w1.double(), b1.double())), w2.double(), b2.double())
    assert_close_scaled(out, want, torch.float32)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_native_gemm_blocked_mlp_training(approximate):
    """gelu_mlp_train / gelu_mlp_backward with own_gemm: the blocks' five GEMMs (two accumulating the weight
    gradients over blocks) on vitkernels' own GEMM, against float64 autograd."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 333, 40, generator=gen)
    w1, b1 = torch.randn(160, 40, generator=gen) / 6, torch.randn(160, generator=gen)
    w2 = torch.randn(40, 160, generator=gen) / 12
    g = torch.randn(2, 333, 40, generator=gen)
    y, pre = torch.ops.vitkernels.gelu_mlp_train(x, w1, b1, w2, None, approximate, 48, True)
    grads = torch.ops.vitkernels.gelu_mlp_backward(g, x, pre, w1, b1, w2, approximate, 48, True)
    leaves = [t.double().requires_grad_() for t in (x, w1, b1, w2)]
    x64, w164, b164, w264 = leaves
    y64 = F.linear(F.gelu(F.linear(x64, w164, b164), approximate=approximate), w264)
    want = torch.autograd.grad(y64, leaves, g.double())
    assert_close_scaled(y, y64.detach(), torch.float32)
    assert_close_scaled(pre, (x.double() @ w1.double().t()).reshape(-1, 160), torch.float32)
    for got, expect in zip((grads[0], grads[1], grads[2], grads[3]), want):
        assert_close_scaled(got, expect, torch.float32)
    ref_grads = torch.ops.vitkernels.gelu_mlp_backward(g, x, pre, w1, b1, w2, approximate, 48, False)
    for got, ref in zip(grads, ref_grads):  # the same sums as ATen's GEMMs within float32 rounding
        assert_close_scaled(got, ref.double(), torch.float32)


def test_native_gemm_gradients_and_opcheck():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(9, 20, generator=gen, requires_grad=True)
    b = torch.randn(20, 11, generator=gen, requires_grad=True)
    c = torch.randn(11, generator=gen, requires_grad=True)
    g = torch.randn(9, 11, generator=gen)
    got = torch.autograd.grad(torch.ops.vitkernels.cpu_gemm(a, b, c), (a, b, c), g)
    leaves = [t.detach().double().requires_grad_() for t in (a, b, c)]
    want = torch.autograd.grad(leaves[0] @ leaves[1] + leaves[2], leaves, g.double())
    for x, y in zip(got, want):
        assert_close_scaled(x, y, torch.float32)
    torch.library.opcheck(torch.ops.vitkernels.cpu_gemm.default, (a, b, c))
    torch.library.opcheck(torch.ops.vitkernels.cpu_gemm.default, (a.detach().t().contiguous().t(), b, None))


def test_native_gemm_compiles_with_fullgraph():
    gen = torch.Generator().manual_seed(4)
    a, b, c = torch.randn(10, 30, generator=gen), torch.randn(30, 12, generator=gen), torch.randn(12, generator=gen)

    def f(a, b, c):
        return torch.ops.vitkernels.cpu_gemm(a, b, c).relu()

    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(a, b, c), f(a, b, c))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_native_gemm_linear_eager(bias):
    """onednn_linear_eager(own_gemm=True): forward, g W and g^T x through the own GEMM (no oneDNN or ATen GEMM
    dispatched), every gradient against float64; the output is no view of an internal tensor (timm's in-place
    ``qkv += bias`` stays allowed)."""
    if not linear_op.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 200, generator=gen, requires_grad=True)
    w = (torch.randn(72, 200, generator=gen) / 14).requires_grad_()
    b = torch.randn(72, generator=gen, requires_grad=True) if bias else None
    g = torch.randn(4, 3, 72, generator=gen)
    leaves = [t for t in (x, w, b) if t is not None]
    with OpCalls() as calls:
        y = torch.ops.vitkernels.onednn_linear_eager(x, w, b, False, False, True)
        got = torch.autograd.grad(y, leaves, g)
    assert not {"mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::linear"} & set(calls.names)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = F.linear(leaves64[0], leaves64[1], leaves64[2] if bias else None)
    want = torch.autograd.grad(y64, leaves64, g.double())
    assert_close_scaled(y, y64.detach(), torch.float32)
    for a, e in zip(got, want):
        assert_close_scaled(a, e, torch.float32)
    assert y._base is None
    y.add_(1.0)


@pytest.mark.parametrize("own", [True, False], ids=["own", "onednn"])
def test_native_gemm_layer_linear_takes_it_where_the_rule_says(own, monkeypatch):
    if not linear_op.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(linear_op, "CPU_GEMM", "onednn")
    monkeypatch.setattr(linear_op, "OWN_GEMM", own)
    monkeypatch.setattr(linear_op, "_AVX2_CPU", False)  # no ATen product rules: oneDNN is the other route
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(600, 64, generator=gen), torch.randn(48, 64, generator=gen) / 8
    b = torch.randn(48, generator=gen)
    with torch.no_grad(), OpCalls() as calls:
        y = linear_op.layer_linear(x, w, b)
    assert ("mkldnn::_linear_pointwise" in calls.names) == (not own)
    assert_close_scaled(y, F.linear(x.double(), w.double(), b.double()), torch.float32)


def test_native_gemm_rule():
    rule = linear_op.own_gemm_takes_it
    assert rule("", "AVX2", True, "onednn")[0]
    assert not rule("", "AVX512", True, "onednn")[0] and not rule("", "DEFAULT", True, "onednn")[0]
    assert not rule("", "AVX2", True, "aten")[0]  # Intel: the Linears run F.linear
    assert not rule("", "AVX2", False, "onednn")[0]  # no vitkernels._C
    assert rule("1", "AVX512", True, "onednn")[0] and not rule("0", "AVX2", True, "onednn")[0]
    assert not rule("1", "AVX2", False, "onednn")[0] and not rule("1", "AVX2", True, "aten")[0]
    with pytest.raises(ValueError, match="VITKERNELS_OWN_GEMM must be 0 or 1"):
        rule("yes", "AVX2", True, "onednn")
    takes, why = rule()
    assert takes == linear_op.OWN_GEMM and why == linear_op.OWN_GEMM_REASON


def test_native_gemm_linear_weight_gradient_keeps_the_weights_layout():
    """``x W^T + b`` through cpu_gemm (the compiled Linears' op where OWN_GEMM): W's gradient comes back row-major
    like W (the product of the transposed view's gradient is formed transposed, so the two transposes cancel: no
    copy), and every gradient matches float64, eager and through aot_eager."""
    if not linear_op.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 50, 40, generator=gen, requires_grad=True)
    w = (torch.randn(24, 40, generator=gen) / 6).requires_grad_()
    b = torch.randn(24, generator=gen, requires_grad=True)
    g = torch.randn(3, 50, 24, generator=gen)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(F.linear(*leaves64), leaves64, g.double())
    for fn in (linear_op._own_gemm_linear, torch.compile(linear_op._own_gemm_linear, backend="aot_eager",
                                                          fullgraph=True)):
        got = torch.autograd.grad(fn(x, w, b), (x, w, b), g)
        assert got[1].is_contiguous()
        for a, e in zip(got, want):
            assert_close_scaled(a, e, torch.float32)


def test_native_gemm_fits_only_linears_it_ran_faster():
    """own_gemm_fits: both sizes >= 32 and out_features a multiple of 16 or >= 128 (MONAI f24's 24-wide stage-0
    Linears ran slower on the own GEMM than on oneDNN); layer_linear sends the others to oneDNN even with OWN_GEMM."""
    fits = linear_op.own_gemm_fits
    assert fits(96, 288) and fits(48, 48) and fits(768, 1000) and fits(3072, 768)
    assert not fits(24, 96) and not fits(96, 24) and not fits(24, 72) and not fits(48, 72)
    if not linear_op.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    x = torch.randn(40, 96)
    for out_features, own in ((24, False), (32, True)):
        w = torch.randn(out_features, 96)
        old = (linear_op.CPU_GEMM, linear_op.OWN_GEMM, linear_op._AVX2_CPU)
        linear_op.CPU_GEMM, linear_op.OWN_GEMM, linear_op._AVX2_CPU = "onednn", True, False
        try:
            with torch.no_grad(), OpCalls() as calls:
                y = linear_op.layer_linear(x, w)
        finally:
            linear_op.CPU_GEMM, linear_op.OWN_GEMM, linear_op._AVX2_CPU = old
        assert ("mkldnn::_linear_pointwise" in calls.names) == (not own)
        assert_close_scaled(y, x.double() @ w.double().t(), torch.float32)
