"""bias_residual: native vs reference (values and gradients, every dtype, with / without bias and drop-path scale,
odd widths, every CPU instruction set), the in-place variant, opcheck, compile, argument errors."""
import pytest
import torch

from vitkernels.ops.bias_residual import bias_residual
from vitkernels.reference.bias_residual import bias_residual as reference_bias_residual

from fused_ops_helpers import (CPU_ISAS, DTYPES, assert_bf16_bitwise, check_against_reference, leaf, native_or_skip,
                               widen, use_cpu_isa)
from helpers import assert_close

SHAPES = [(2, 9, 96), (3, 5, 37), (4, 2, 3, 16)]


def make_inputs(shape, with_bias=True, with_scale=True):
    def make(dtype):
        gen = torch.Generator().manual_seed(0)
        y = torch.randn(shape, generator=gen, dtype=torch.float64)
        b = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        s = torch.tensor([0.0, 1.25, 1.25, 0.0, 1.25, 1.25, 1.25][:shape[0]], dtype=torch.float64)
        return (leaf(y, dtype), leaf(b, dtype) if with_bias else None, leaf(r, dtype),
                s.to(dtype) if with_scale else None)
    return make


def native(y, b, r, s):
    return bias_residual(y, b, r, s, backend="native")


@pytest.mark.parametrize("with_bias, with_scale", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_matches_reference(shape, dtype, with_bias, with_scale):
    native_or_skip("bias_residual")
    check_against_reference(native, reference_bias_residual, make_inputs(shape, with_bias, with_scale), dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set(isa, monkeypatch):
    native_or_skip("bias_residual")
    use_cpu_isa(monkeypatch, isa)
    check_against_reference(native, reference_bias_residual, make_inputs((3, 4, 53)), torch.float32)


def test_matches_timm_residual_of_a_linear_with_drop_path():
    """What the fast block relies on: x + drop_path(fc2(h)) == bias_residual(h W^T, b, x, drop-path factors)."""
    native_or_skip("bias_residual")
    fc2 = torch.nn.Linear(24, 16)
    h, x = torch.randn(3, 7, 24), torch.randn(3, 7, 16)
    keep = torch.tensor([1.0, 0.0, 1.0]) / 0.8
    expected = x + fc2(h) * keep.view(-1, 1, 1)
    assert_close(bias_residual(torch.nn.functional.linear(h, fc2.weight), fc2.bias, x, keep, backend="native"),
                 expected)


def test_inplace_variant():
    native_or_skip("bias_residual")
    y, r, b, s = torch.randn(3, 6, 40), torch.randn(3, 6, 40), torch.randn(40), torch.tensor([1.0, 0.0, 2.0])
    expected = bias_residual(y, b, r, s, backend="native")
    out = y.clone()
    torch.ops.vitkernels.bias_residual_(out, b, r, s)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16-params", "fp32-params"])
@pytest.mark.parametrize("scale", [False, True], ids=["no-scale", "scale"])
@pytest.mark.parametrize("shape", [(3, 6, 40), (2, 300, 33), (4, 1, 7)], ids=str)
def test_native_bfloat16_is_the_float_op_rounded(shape, scale, param_dtype):
    """bfloat16 runs chunk by chunk (a chunk stays in one sample, for its drop-path scale) through float scratch,
    functional and in place: bitwise the float op on the widened inputs, rounded. fp32 bias / scale beside bf16
    activations is the autocast case."""
    native_or_skip("bias_residual")
    y, r = (torch.randn(shape).bfloat16() for _ in range(2))
    y.view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    b = torch.randn(shape[-1]).to(param_dtype)
    s = torch.rand(shape[0]).to(param_dtype) if scale else None
    want = torch.ops.vitkernels.bias_residual(*widen(y, b, r, s))
    assert_bf16_bitwise(torch.ops.vitkernels.bias_residual(y, b, r, s), want, "bias_residual")
    out = y.clone()
    torch.ops.vitkernels.bias_residual_(out, b, r, s)
    assert_bf16_bitwise(out, want, "bias_residual_")


def test_gradcheck_float64():
    native_or_skip("bias_residual")
    y, r = (torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y, b, r: native(y, b, r, s), (y, b, r))
    assert torch.autograd.gradcheck(lambda y, b, r: native(y, b, r, None), (y, b, r))


def test_opcheck():
    native_or_skip("bias_residual")
    y, r = torch.randn(3, 5, 20, requires_grad=True), torch.randn(3, 5, 20, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    s = torch.tensor([0.0, 1.5, 1.5])
    for args in ((y, b, r, s), (y, None, r, None)):
        torch.library.opcheck(torch.ops.vitkernels.bias_residual.default, args)
    torch.library.opcheck(torch.ops.vitkernels.bias_residual_.default, (y.detach().clone(), b.detach(), r.detach(), s))


def test_compiles_fullgraph():
    native_or_skip("bias_residual")
    y, r = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    fn = torch.compile(lambda y, b, r: native(y, b, r, None).relu(), backend="aot_eager", fullgraph=True)
    out = fn(y, b, r)
    out.sum().backward()
    assert_close(out, reference_bias_residual(y, b, r).relu())
    assert y.grad is not None and b.grad is not None and r.grad is not None


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(y=torch.randn(3, 4), bias=None, residual=torch.randn(3, 5)), ValueError, "residual must have shape"),
    (dict(y=torch.randn(3, 4), bias=torch.randn(5), residual=torch.randn(3, 4)), ValueError, "bias must have shape"),
    (dict(y=torch.randn(3, 4), bias=None, residual=torch.randn(3, 4).double()), TypeError, "residual must have"),
    (dict(y=torch.randn(3, 4), bias=None, residual=torch.randn(3, 4), scale=torch.ones(2)), ValueError,
     "scale must hold one value per sample"),
    (dict(y=torch.randn(4), bias=None, residual=torch.randn(4)), ValueError, "y must be"),
])
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bias_residual(**kwargs)


def test_native_op_checks_its_arguments():
    native_or_skip("bias_residual")
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.vitkernels.bias_residual(torch.randn(3, 4), None, torch.randn(3, 5), None)
    with pytest.raises(RuntimeError, match="scale must hold"):
        torch.ops.vitkernels.bias_residual(torch.randn(3, 4), None, torch.randn(3, 4), torch.ones(5))


# --- vitkernels::bias_residual_eager: the eager CPU path (a C++ autograd Function) ------------------------------------

def _leaves(args, requires):
    y, b, r, s = args
    y, b, r = (None if t is None else t.detach().clone().requires_grad_(q) for t, q in zip((y, b, r), requires))
    return y, b, r, s


@pytest.mark.parametrize("requires", [(True, True, True), (False, False, True), (True, False, False)],
                         ids=["all", "residual", "y"])
@pytest.mark.parametrize("with_bias, with_scale", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_eager_op_matches_the_op_with_its_registered_autograd(dtype, with_bias, with_scale, requires):
    """The same kernel and gradient formula, so the same bits: the output and the gradients asked for."""
    native_or_skip("bias_residual")
    results = []
    for fn in (torch.ops.vitkernels.bias_residual_eager, torch.ops.vitkernels.bias_residual):
        args = _leaves(make_inputs((3, 5, 40), with_bias, with_scale)(dtype), requires)
        out = fn(*args)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
        results.append([out] + [t.grad if t is not None else None for t in args[:3]])
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        assert got is None or (got.dtype == want.dtype and torch.equal(got, want))


def test_eager_op_dispatches_the_op_and_differentiates_twice():
    """The op through the dispatcher (a dispatch mode sees it; meta tensors get its fake); the gradient is ATen ops,
    so a second-order gradient flows (through the scale's product)."""
    native_or_skip("bias_residual")
    from helpers import OpCalls

    op = torch.ops.vitkernels.bias_residual_eager
    y, b, r, s = _leaves(make_inputs((3, 4, 8))(torch.float64), (True, True, True))
    with torch.no_grad(), OpCalls() as calls:
        out = op(y, b, r, s)
    assert calls.names == ["vitkernels::bias_residual"] and out.grad_fn is None
    meta = op(y.to("meta"), None, r.to("meta"), None)
    assert meta.device.type == "meta" and meta.shape == y.shape
    assert torch.autograd.gradcheck(lambda y, b, r: op(y, b, r, s), (y, b, r))
    assert torch.autograd.gradgradcheck(lambda y, b, r: op(y, b, r, s), (y, b, r))
