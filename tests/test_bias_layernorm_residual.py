"""bias_layernorm_residual (Swin V2's post-norm seam): native vs reference (values and gradients, every dtype, with /
without bias, drop-path scale and LayerNorm affine, odd widths, every CPU instruction set), the in-place variant
(aliasing included), timm's V2 block seam, opcheck, compile, gradcheck, argument errors."""
import pytest
import torch

from vitkernels.ops.bias_layernorm_residual import bias_layernorm_residual
from vitkernels.reference.bias_layernorm_residual import bias_layernorm_residual as reference_blnr

from fused_ops_helpers import (CPU_ISAS, DTYPES, check_against_reference, check_split_across_threads, native_or_skip,
                               residual_layernorm_inputs, use_cpu_isa)
from helpers import assert_close

SHAPES = [(2, 9, 96), (3, 5, 37), (4, 2, 3, 16)]


def make_inputs(shape, with_bias=True, with_scale=True, affine=True):
    return residual_layernorm_inputs(shape, with_bias, with_scale, affine, normalised="y")


def native(y, b, r, w, lb, eps, s):
    return bias_layernorm_residual(y, b, r, w, lb, eps, s, backend="native")


@pytest.mark.parametrize("with_bias, with_scale, affine", [
    (True, True, True), (True, False, True), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_matches_reference(shape, dtype, with_bias, with_scale, affine):
    native_or_skip("bias_layernorm_residual")
    check_against_reference(native, reference_blnr, make_inputs(shape, with_bias, with_scale, affine), dtype)


def test_native_rows_split_across_threads():
    """200 rows of 512 are two tasks of the backward's column sums (bias, LayerNorm weight and bias)."""
    native_or_skip("bias_layernorm_residual")
    check_against_reference(native, reference_blnr, make_inputs((2, 100, 512)), torch.float32)
    check_split_across_threads(native, make_inputs((2, 100, 512)))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_native_every_instruction_set(isa, monkeypatch):
    native_or_skip("bias_layernorm_residual")
    use_cpu_isa(monkeypatch, isa)
    check_against_reference(native, reference_blnr, make_inputs((3, 4, 53)), torch.float32)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_timm_v2_block_seam(train):
    """What the fast Swin V2 block relies on: x + drop_path(norm(fc2(h))) from fc2's product without its bias, with
    timm's DropPath drawing the same per-sample factors (0 or 1 / keep) from the same random stream."""
    native_or_skip("bias_layernorm_residual")
    from vitkernels.modules.swin import _drop_path_factors
    from vitkernels.reference.layers import DropPath
    fc2, norm, drop_path = torch.nn.Linear(40, 24), torch.nn.LayerNorm(24), DropPath(0.4)
    drop_path.train(train)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    h, x = torch.randn(6, 7, 40), torch.randn(6, 7, 24)
    torch.manual_seed(3)
    want = x + drop_path(norm(fc2(h)))
    torch.manual_seed(3)
    factors = _drop_path_factors(drop_path, x)
    assert (factors is not None) == train
    got = bias_layernorm_residual(torch.nn.functional.linear(h, fc2.weight), fc2.bias, x, norm.weight, norm.bias,
                                  norm.eps, factors, backend="native")
    assert_close(got, want)


def test_native_inplace_variant():
    native_or_skip("bias_layernorm_residual")
    y, r, b = torch.randn(3, 6, 40), torch.randn(3, 6, 40), torch.randn(40)
    w, lb, s = torch.randn(40), torch.randn(40), torch.tensor([1.0, 0.0, 2.0])
    expected = bias_layernorm_residual(y, b, r, w, lb, 1e-5, s, backend="native")
    for scale in (s, None):
        want = bias_layernorm_residual(y, b, r, w, lb, 1e-5, scale, backend="native")
        got = y.clone()
        torch.ops.vitkernels.bias_layernorm_residual_(got, b, r, scale, w, lb, 1e-5)
        assert torch.equal(got, want)
    assert torch.equal(want, bias_layernorm_residual(y, b, r, w, lb, 1e-5, None, backend="native"))
    assert not torch.equal(expected, want)  # the scale took effect
    # non-contiguous and bfloat16 targets: through a float copy, written back
    got = y.clone().transpose(0, 1).contiguous().transpose(0, 1)
    torch.ops.vitkernels.bias_layernorm_residual_(got, b, r, s, w, lb, 1e-5)
    assert torch.equal(got, expected)
    got = y.bfloat16()
    torch.ops.vitkernels.bias_layernorm_residual_(got, b.bfloat16(), r.bfloat16(), s, w, lb, 1e-5)
    assert_close(got.float(), reference_blnr(y.bfloat16().float(), b.bfloat16().float(), r.bfloat16().float(), w, lb,
                                             1e-5, s), atol=5e-2, rtol=2e-2)


def test_native_inplace_variant_with_the_residual_or_a_parameter_in_y():
    """The residual (or LayerNorm's weight) sharing y's memory is read as it was before the call, not as the rows
    the op has already written."""
    native_or_skip("bias_layernorm_residual")
    y, b = torch.randn(4, 5, 16), torch.randn(16)
    want = bias_layernorm_residual(y, b, y.clone(), None, None, 1e-5, backend="native")
    got = y.clone()
    torch.ops.vitkernels.bias_layernorm_residual_(got, b, got, None, None, None, 1e-5)
    assert torch.equal(got, want)
    rows = torch.randn(4, 5, 16)
    shifted = rows.clone()  # the residual of row r is row r + 1 of y itself: overlapping, not equal
    want = bias_layernorm_residual(shifted[1:3], b, rows[2:4].clone(), rows[0, 0].clone(), None, 1e-5,
                                   backend="native")
    torch.ops.vitkernels.bias_layernorm_residual_(shifted[1:3], b, shifted[2:4], None, shifted[0, 0], None, 1e-5)
    assert torch.equal(shifted[1:3], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_rows_of_width_zero(dtype):
    """Rows of width 0: the row statistics are ATen LayerNorm's (mean 0, rstd NaN), never uninitialised memory,
    and the backward takes them back."""
    native_or_skip("bias_layernorm_residual")
    ops = torch.ops.vitkernels
    y, r = torch.randn(2, 3, 0, dtype=dtype), torch.randn(2, 3, 0, dtype=dtype)
    out, mean, rstd = ops.bias_layernorm_residual(y, None, r, None, None, None, 1e-5)
    assert out.shape == (2, 3, 0) and torch.equal(mean, torch.zeros(2, 3)) and rstd.isnan().all()
    grads = ops.bias_layernorm_residual_backward(torch.zeros_like(y), y, None, mean, rstd, None, None)
    assert grads[0].shape == (2, 3, 0) and all(g.numel() == 0 for g in grads[1:])


def test_native_gradcheck_float64():
    native_or_skip("bias_layernorm_residual")
    y, r = (torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b, w, lb = (torch.randn(7, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y, b, r, w, lb: native(y, b, r, w, lb, 1e-5, s), (y, b, r, w, lb))
    assert torch.autograd.gradcheck(lambda y, r: native(y, None, r, None, None, 1e-5, None), (y, r))


def test_opcheck():
    native_or_skip("bias_layernorm_residual")
    y, r = torch.randn(3, 5, 20, requires_grad=True), torch.randn(3, 5, 20, requires_grad=True)
    b, w, lb = (torch.randn(20, requires_grad=True) for _ in range(3))
    s = torch.tensor([0.0, 1.5, 1.5])
    for args in ((y, b, r, s, w, lb, 1e-5), (y, None, r, None, None, None, 1e-6)):
        torch.library.opcheck(torch.ops.vitkernels.bias_layernorm_residual.default, args)
    torch.library.opcheck(torch.ops.vitkernels.bias_layernorm_residual_.default,
                          (y.detach().clone(), b.detach(), r.detach(), s, w.detach(), lb.detach(), 1e-5))


def test_compiles_fullgraph():
    native_or_skip("bias_layernorm_residual")
    y, r = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32, requires_grad=True)
    b, w, lb = (torch.randn(32, requires_grad=True) for _ in range(3))

    def fn(y, b, r, w, lb):
        return native(y, b, r, w, lb, 1e-5, None).relu()

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(y, b, r, w, lb)
    out.sum().backward()
    assert_close(out, reference_blnr(y, b, r, w, lb).relu())
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
        bias_layernorm_residual(**args)


def test_native_op_checks_its_arguments():
    native_or_skip("bias_layernorm_residual")
    ops, y = torch.ops.vitkernels, torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="weight and ln_bias must be"):
        ops.bias_layernorm_residual(y, None, y, None, torch.randn(5), None, 1e-5)
    with pytest.raises(RuntimeError, match="residual must be"):
        ops.bias_layernorm_residual_(y, None, torch.randn(4, 3), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="scale must hold"):
        ops.bias_layernorm_residual(y, None, y, torch.ones(2), None, None, 1e-5)
    out, mean, rstd = ops.bias_layernorm_residual(y, None, y, None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="mean and rstd must be"):
        ops.bias_layernorm_residual_backward(out, y, None, mean[:2], rstd, None, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.bias_layernorm_residual_backward(out, y, torch.randn(5), mean, rstd, None, None)
    with pytest.raises(RuntimeError, match="scale must hold"):
        ops.bias_layernorm_residual_backward(out, y, None, mean, rstd, None, torch.ones(4))
    with pytest.raises(RuntimeError, match="grad_out must be"):
        ops.bias_layernorm_residual_backward(out[:2], y, None, mean, rstd, None, None)
