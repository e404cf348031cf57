"""bias_residual_layernorm: native vs reference (values and gradients of both outputs, every dtype, with / without
bias, drop-path scale and LayerNorm affine, odd widths, every CPU instruction set), the in-place variant, opcheck,
compile, argument errors."""
import pytest
import torch

from vitkernels.ops.bias_residual_layernorm import bias_residual_layernorm
from vitkernels.reference.bias_residual_layernorm import bias_residual_layernorm as reference_brln

from fused_ops_helpers import (CPU_ISAS, DTYPES, assert_bf16_bitwise, check_against_reference,
                               check_split_across_threads, native_or_skip, residual_layernorm_inputs, use_cpu_isa,
                               widen)
from helpers import assert_close

SHAPES = [(2, 9, 96), (3, 5, 37), (4, 2, 3, 16)]


def make_inputs(shape, with_bias=True, with_scale=True, affine=True):
    return residual_layernorm_inputs(shape, with_bias, with_scale, affine, normalised="residual")


def native(y, b, r, w, lb, eps, s):
    return bias_residual_layernorm(y, b, r, w, lb, eps, s, backend="native")


@pytest.mark.parametrize("with_bias, with_scale, affine", [
    (True, True, True), (True, False, True), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_matches_reference(shape, dtype, with_bias, with_scale, affine):
    native_or_skip("bias_residual_layernorm")
    check_against_reference(native, reference_brln, make_inputs(shape, with_bias, with_scale, affine), dtype)


def test_rows_split_across_threads():
    """200 rows of 512 are two tasks of the backward's column sums (bias, LayerNorm weight and bias)."""
    native_or_skip("bias_residual_layernorm")
    check_against_reference(native, reference_brln, make_inputs((2, 100, 512)), torch.float32)
    check_split_across_threads(native, make_inputs((2, 100, 512)))


def test_gradient_through_the_normalised_output_only():
    """x1 unused downstream (its gradient is None): the LayerNorm path alone."""
    native_or_skip("bias_residual_layernorm")
    check_against_reference(lambda *a: native(*a)[1], lambda *a: reference_brln(*a)[1], make_inputs((3, 4, 40)),
                            torch.float32)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set(isa, monkeypatch):
    native_or_skip("bias_residual_layernorm")
    use_cpu_isa(monkeypatch, isa)
    check_against_reference(native, reference_brln, make_inputs((3, 4, 53)), torch.float32)


def test_matches_timm_block_seam():
    """What the fast block relies on: x1 = x + drop_path(proj(o)); norm2(x1) from proj's product without bias."""
    native_or_skip("bias_residual_layernorm")
    proj, norm = torch.nn.Linear(24, 24), torch.nn.LayerNorm(24)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    o, x = torch.randn(3, 7, 24), torch.randn(3, 7, 24)
    x1 = x + proj(o)
    got_x1, got = bias_residual_layernorm(torch.nn.functional.linear(o, proj.weight), proj.bias, x, norm.weight,
                                          norm.bias, norm.eps, backend="native")
    assert_close(got_x1, x1)
    assert_close(got, norm(x1))


def test_inplace_variant():
    native_or_skip("bias_residual_layernorm")
    y, r, b = torch.randn(3, 6, 40), torch.randn(3, 6, 40), torch.randn(40)
    w, lb, s = torch.randn(40), torch.randn(40), torch.tensor([1.0, 0.0, 2.0])
    x1, expected = bias_residual_layernorm(y, b, r, w, lb, 1e-5, s, backend="native")
    y2, out = y.clone(), torch.empty_like(y)
    torch.ops.vitkernels.bias_residual_layernorm_(y2, b, r, s, w, lb, 1e-5, out)
    assert torch.equal(y2, x1) and torch.equal(out, expected)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16-params", "fp32-params"])
@pytest.mark.parametrize("scale", [False, True], ids=["no-scale", "scale"])
@pytest.mark.parametrize("shape", [(3, 6, 40), (2, 300, 33), (4, 1, 7)], ids=str)
def test_native_bfloat16_is_the_float_op_rounded(shape, scale, param_dtype):
    """bfloat16 runs chunk by chunk (a chunk stays in one sample, for its drop-path scale) through float scratch,
    forward, in place and backward (with and without a gradient reaching x1 directly): x1, the LayerNorm output,
    the row statistics and the row gradients bitwise the float op on the widened inputs (rounded); the column sums
    (bias and LayerNorm parameter gradients, summed in float per chunk, in double across) within float rounding.
    fp32 parameters beside bf16 activations is the autocast case."""
    native_or_skip("bias_residual_layernorm")
    ops = torch.ops.vitkernels
    y, r = (torch.randn(shape).bfloat16() for _ in range(2))
    b, w, lb = (torch.randn(shape[-1]).to(param_dtype) for _ in range(3))
    s = torch.rand(shape[0]).to(param_dtype) if scale else None
    x1_f, out_f, mean_f, rstd_f = ops.bias_residual_layernorm(*widen(y, b, r, s, w, lb), 1e-5)
    x1, out, mean, rstd = ops.bias_residual_layernorm(y, b, r, s, w, lb, 1e-5)
    assert_bf16_bitwise(x1, x1_f, "x1")
    assert_bf16_bitwise(out, out_f, "out")
    assert mean.dtype == rstd.dtype == torch.float32
    assert torch.equal(mean, mean_f) and torch.equal(rstd, rstd_f)
    y2, out2 = y.clone(), torch.empty_like(y)
    ops.bias_residual_layernorm_(y2, b, r, s, w, lb, 1e-5, out2)
    assert_bf16_bitwise(y2, x1_f, "x1 in place")
    assert_bf16_bitwise(out2, out_f, "out in place")
    g_out, g_x1 = (torch.randn(shape).bfloat16() for _ in range(2))
    for grad_x1 in (g_x1, None):
        got = ops.bias_residual_layernorm_backward(grad_x1, g_out, x1, mean, rstd, w, s)
        want = ops.bias_residual_layernorm_backward(*widen(grad_x1, g_out, x1), mean, rstd, *widen(w, s))
        assert_bf16_bitwise(got[0], want[0], "grad residual")
        if scale:
            assert_bf16_bitwise(got[1], want[1], "grad y")
        else:
            assert got[1].numel() == 0
        for name, g, g_want in zip(("grad bias", "grad weight", "grad ln_bias"), got[2:], want[2:]):
            assert g.dtype == param_dtype, name
            assert_close(g.double(), g_want.to(param_dtype).double(), atol=1e-4,
                         rtol=1e-2 if param_dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_rows_of_width_zero(dtype):
    """Rows of width 0: the row statistics are ATen LayerNorm's (mean 0, rstd NaN), never uninitialised memory,
    and the backward takes them back."""
    native_or_skip("bias_residual_layernorm")
    ops = torch.ops.vitkernels
    y, r = torch.randn(2, 3, 0, dtype=dtype), torch.randn(2, 3, 0, dtype=dtype)
    x1, out, mean, rstd = ops.bias_residual_layernorm(y, None, r, None, None, None, 1e-5)
    _, aten_mean, aten_rstd = torch.native_layer_norm(y, [0], None, None, 1e-5)
    assert x1.shape == out.shape == (2, 3, 0)
    assert torch.equal(mean, aten_mean.reshape(2, 3)) and rstd.isnan().all() and aten_rstd.isnan().all()
    grads = ops.bias_residual_layernorm_backward(None, torch.zeros_like(y), x1, mean, rstd, None, None)
    assert grads[0].shape == (2, 3, 0) and all(g.numel() == 0 for g in grads[1:])


def test_gradcheck_float64():
    native_or_skip("bias_residual_layernorm")
    y, r = (torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b, w, lb = (torch.randn(7, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y, b, r, w, lb: native(y, b, r, w, lb, 1e-5, s), (y, b, r, w, lb))
    assert torch.autograd.gradcheck(lambda y, r: native(y, None, r, None, None, 1e-5, None), (y, r))


def test_opcheck():
    native_or_skip("bias_residual_layernorm")
    y, r = torch.randn(3, 5, 20, requires_grad=True), torch.randn(3, 5, 20, requires_grad=True)
    b, w, lb = (torch.randn(20, requires_grad=True) for _ in range(3))
    s = torch.tensor([0.0, 1.5, 1.5])
    for args in ((y, b, r, s, w, lb, 1e-5), (y, None, r, None, None, None, 1e-6)):
        torch.library.opcheck(torch.ops.vitkernels.bias_residual_layernorm.default, args)
    torch.library.opcheck(torch.ops.vitkernels.bias_residual_layernorm_.default,
                          (y.detach().clone(), b.detach(), r.detach(), s, w.detach(), lb.detach(), 1e-5,
                           torch.empty(3, 5, 20)))


def test_compiles_fullgraph():
    native_or_skip("bias_residual_layernorm")
    y, r = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32, requires_grad=True)
    b, w, lb = (torch.randn(32, requires_grad=True) for _ in range(3))

    def fn(y, b, r, w, lb):
        x1, out = native(y, b, r, w, lb, 1e-5, None)
        return x1 + out.relu()

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(y, b, r, w, lb)
    out.sum().backward()
    x1, ln = reference_brln(y, b, r, w, lb)
    assert_close(out, x1 + ln.relu())
    assert all(t.grad is not None for t in (y, b, r, w, lb))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(weight=torch.randn(5)), ValueError, "weight must have shape"),
    (dict(ln_bias=torch.randn(2, 4)), ValueError, "ln_bias must have 1 dimensions"),
    (dict(eps=-1.0), ValueError, "eps must be"),
    (dict(residual=torch.randn(3, 5)), ValueError, "residual must have shape"),
])
def test_bad_inputs(kwargs, exc, match):
    args = dict(y=torch.randn(3, 4), bias=None, residual=torch.randn(3, 4), weight=None, ln_bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        bias_residual_layernorm(**args)


def test_native_op_checks_its_arguments():
    native_or_skip("bias_residual_layernorm")
    y = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="weight and ln_bias must be"):
        torch.ops.vitkernels.bias_residual_layernorm(y, None, y, None, torch.randn(5), None, 1e-5)
    x1, out, mean, rstd = torch.ops.vitkernels.bias_residual_layernorm(y, None, y, None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="mean and rstd must be"):
        torch.ops.vitkernels.bias_residual_layernorm_backward(None, out, x1, mean[:2], rstd, None, None)
