"""patch_merging_norm: native vs reference (values and gradients, every dtype, odd H / W, with / without affine,
every CPU instruction set), timm's PatchMerging, opcheck, compile, argument errors."""
import pytest
import torch

from vitkernels.ops.patch_merging import patch_merging_norm
from vitkernels.reference.patch_merging import patch_merging_norm as reference_pmn

from fused_ops_helpers import (CPU_ISAS, DTYPES, assert_bf16_bitwise, check_against_reference,
                               check_split_across_threads, leaf, native_or_skip, widen, use_cpu_isa)
from helpers import assert_close, import_timm

SHAPES = [(2, 8, 8, 16), (1, 7, 9, 5), (3, 1, 4, 8), (1, 5, 1, 3)]  # even, odd both, one row, one column


def make_inputs(shape, affine=True):
    def make(dtype):
        gen = torch.Generator().manual_seed(0)
        x = 2 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5
        w = 1 + 0.5 * torch.randn(4 * shape[-1], generator=gen, dtype=torch.float64)
        b = torch.randn(4 * shape[-1], generator=gen, dtype=torch.float64)
        return leaf(x, dtype), leaf(w, dtype) if affine else None, leaf(b, dtype) if affine else None, 1e-5
    return make


def native(x, w, b, eps):
    return patch_merging_norm(x, w, b, eps, backend="native")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_matches_reference(shape, dtype, affine):
    native_or_skip("patch_merging_norm")
    check_against_reference(native, reference_pmn, make_inputs(shape, affine), dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set(isa, monkeypatch):
    native_or_skip("patch_merging_norm")
    use_cpu_isa(monkeypatch, isa)
    check_against_reference(native, reference_pmn, make_inputs((2, 7, 6, 24)), torch.float32)


def test_rows_split_across_threads():
    """A 32 x 32 map of 128 channels merges into 256 rows of 512: two tasks of the backward's column sums."""
    native_or_skip("patch_merging_norm")
    check_against_reference(native, reference_pmn, make_inputs((1, 32, 32, 128)), torch.float32)
    check_split_across_threads(native, make_inputs((1, 32, 32, 128)))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32, None], ids=["bf16-affine", "fp32-affine",
                                                                                    "no-affine"])
@pytest.mark.parametrize("shape", [(2, 9, 10, 24), (1, 4, 4, 3), (3, 5, 7, 40)], ids=str)
def test_native_bfloat16_is_the_float_op_rounded(shape, param_dtype, isa, monkeypatch):
    """bfloat16 runs row by row through float scratch (no whole-tensor conversion), forward and backward: the
    output, the row statistics and the input gradient bitwise the float op on the widened inputs (rounded, odd
    edges padded); the LayerNorm parameter gradients within float rounding of it. fp32 affine beside bf16 tokens
    is the autocast case."""
    native_or_skip("patch_merging_norm")
    use_cpu_isa(monkeypatch, isa)
    ops = torch.ops.vitkernels
    x = (3 * torch.randn(shape) + 1).bfloat16()
    C4 = 4 * shape[-1]
    w, b = (None, None) if param_dtype is None else (torch.randn(C4).to(param_dtype), torch.randn(C4).to(param_dtype))
    out, mean, rstd = ops.patch_merging_norm(x, w, b, 1e-5)
    want, want_mean, want_rstd = ops.patch_merging_norm(*widen(x, w, b), 1e-5)
    assert_bf16_bitwise(out, want, "out")
    assert mean.dtype == rstd.dtype == torch.float32
    assert torch.equal(mean, want_mean) and torch.equal(rstd, want_rstd)
    g = torch.randn(out.shape).bfloat16()
    dx, dw, db = ops.patch_merging_norm_backward(g, x, mean, rstd, w)
    want_dx, want_dw, want_db = ops.patch_merging_norm_backward(*widen(g, x), mean, rstd, *widen(w))
    assert_bf16_bitwise(dx, want_dx, "grad x")
    expected_dtype = torch.bfloat16 if param_dtype is None else param_dtype
    for got, wanted in ((dw, want_dw), (db, want_db)):
        assert got.dtype == expected_dtype
        assert_close(got.double(), wanted.to(expected_dtype).double(), atol=1e-4,
                     rtol=1e-2 if expected_dtype == torch.bfloat16 else 1e-5)


def test_matches_timm_patch_merging():
    native_or_skip("patch_merging_norm")
    timm = import_timm()
    from timm.models.swin_transformer import PatchMerging

    merge = PatchMerging(12, 24)
    with torch.no_grad():
        merge.norm.weight.normal_()
        merge.norm.bias.normal_()
    x = torch.randn(2, 9, 7, 12)
    expected = merge(x)
    got = torch.nn.functional.linear(native(x, merge.norm.weight, merge.norm.bias, merge.norm.eps),
                                     merge.reduction.weight)
    assert_close(got, expected)
    assert timm is not None


def test_gradcheck_float64():
    native_or_skip("patch_merging_norm")
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, w, b: native(x, w, b, 1e-5), (x, w, b))


def test_opcheck():
    native_or_skip("patch_merging_norm")
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    w, b = (torch.randn(32, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.vitkernels.patch_merging_norm.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.vitkernels.patch_merging_norm.default, (x, None, None, 1e-5))


def test_compiles_fullgraph():
    native_or_skip("patch_merging_norm")
    x = torch.randn(2, 6, 6, 8, requires_grad=True)
    w, b = (torch.randn(32, requires_grad=True) for _ in range(2))
    out = torch.compile(lambda x, w, b: native(x, w, b, 1e-5).sigmoid(), backend="aot_eager", fullgraph=True)(x, w, b)
    out.sum().backward()
    assert_close(out, reference_pmn(x, w, b).sigmoid())
    assert all(t.grad is not None for t in (x, w, b))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=torch.randn(2, 4, 4)), ValueError, "x must have 4 dimensions"),
    (dict(weight=torch.randn(8)), ValueError, "weight must have shape"),
    (dict(eps="small"), ValueError, "eps must be"),
    (dict(x=torch.randn(1, 4, 4, 4).long()), TypeError, "x must have dtype"),
])
def test_bad_inputs(kwargs, exc, match):
    args = dict(x=torch.randn(1, 4, 4, 4), weight=None, bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        patch_merging_norm(**args)


def test_native_op_checks_its_arguments():
    native_or_skip("patch_merging_norm")
    with pytest.raises(RuntimeError, match="weight and bias must be"):
        torch.ops.vitkernels.patch_merging_norm(torch.randn(1, 4, 4, 4), torch.randn(8), None, 1e-5)
    x = torch.randn(1, 4, 4, 4)
    out, mean, rstd = torch.ops.vitkernels.patch_merging_norm(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.vitkernels.patch_merging_norm_backward(out[:, :1], x, mean, rstd, None)


# --- vitkernels::patch_merging_norm_eager: the eager CPU path (a C++ autograd Function) -------------------------------

def _op_with_registered_autograd(x, w, b, eps):
    return torch.ops.vitkernels.patch_merging_norm(x, w, b, eps)[0]


@pytest.mark.parametrize("affine, requires", [(True, (True, True, True)), (True, (False, True, True)),
                                               (True, (True, False, False)), (False, (True, False, False))],
                         ids=["all", "params", "x", "x-no-affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_eager_op_matches_the_op_with_its_registered_autograd(dtype, affine, requires):
    """The same kernels, so the same bits: the output and the gradients asked for."""
    native_or_skip("patch_merging_norm")
    results = []
    for fn in (torch.ops.vitkernels.patch_merging_norm_eager, _op_with_registered_autograd):
        x, w, b, eps = make_inputs((2, 7, 9, 8), affine)(dtype)
        x, w, b = (None if t is None else t.detach().clone().requires_grad_(q) for t, q in zip((x, w, b), requires))
        out = fn(x, w, b, eps)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
        results.append([out] + [None if t is None else t.grad for t in (x, w, b)])
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        assert got is None or (got.dtype == want.dtype and torch.equal(got, want))


def test_eager_op_dispatches_the_op():
    """The ops through the dispatcher (a dispatch mode sees them; meta tensors get the fake); a second-order
    gradient is refused as the op's registered autograd refuses it."""
    native_or_skip("patch_merging_norm")
    from helpers import OpCalls

    op = torch.ops.vitkernels.patch_merging_norm_eager
    x, w, b, eps = make_inputs((2, 8, 8, 16))(torch.float32)
    with OpCalls() as calls:
        op(x, w, b, eps).pow(2).sum().backward()
    assert calls.names.count("vitkernels::patch_merging_norm") == 1
    assert calls.names.count("vitkernels::patch_merging_norm_backward") == 1
    with torch.no_grad(), OpCalls() as calls:
        out = op(x, w, b, eps)
    assert calls.names == ["vitkernels::patch_merging_norm"] and out.grad_fn is None
    meta = op(x.to("meta"), None, None, eps)
    assert meta.device.type == "meta" and meta.shape == (2, 4, 4, 64)
    (grad,) = torch.autograd.grad(op(x, w, b, eps).pow(2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward .* native backend of patch_merging_norm"):
        torch.autograd.grad(grad.pow(2).sum(), x)
