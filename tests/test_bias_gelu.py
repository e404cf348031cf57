"""bias_gelu: native vs reference (values and gradients, every dtype, odd widths, every CPU instruction set), the
in-place variant, opcheck, compile, argument errors."""
import pytest
import torch

import vitkernels
from vitkernels.ops.bias_gelu import bias_gelu
from vitkernels.reference.bias_gelu import bias_gelu as reference_bias_gelu

from fused_ops_helpers import (CPU_ISAS, DTYPES, assert_bf16_bitwise, check_against_reference,
                               check_split_across_threads, leaf, native_or_skip, widen, use_cpu_isa)
from helpers import assert_close

SHAPES = [(2, 9, 96), (3, 37), (1, 4, 5, 16), (7, 1)]  # C: a multiple of 16, odd, one vector, one value


def make_inputs(shape, approximate):
    def make(dtype):
        gen = torch.Generator().manual_seed(0)
        x = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        b = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
        return leaf(x, dtype), leaf(b, dtype), approximate
    return make


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_matches_reference(shape, dtype, approximate):
    native_or_skip("bias_gelu")
    check_against_reference(lambda x, b, a: bias_gelu(x, b, a, backend="native"), reference_bias_gelu,
                            make_inputs(shape, approximate), dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set(isa, monkeypatch):
    native_or_skip("bias_gelu")
    use_cpu_isa(monkeypatch, isa)
    for approximate in ("none", "tanh"):
        check_against_reference(lambda x, b, a: bias_gelu(x, b, a, backend="native"), reference_bias_gelu,
                                make_inputs((5, 53), approximate), torch.float32)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_tanh_gelu_far_from_zero(isa, monkeypatch):
    """The tanh GELU and its derivative where tanh saturates: gelu'(x) -> 0 (x -> -inf) and -> 1 (x -> +inf). Its
    tanh was -0.99999994 at -10 and beyond, which the derivative's ~x^3 factor turned into -2.8e-3 at x = -60."""
    native_or_skip("bias_gelu")
    use_cpu_isa(monkeypatch, isa)
    x = torch.tensor([-60.0, -30.0, -13.0, -10.0, -9.0, -6.0, 6.0, 9.0, 10.0, 13.0, 30.0, 60.0] * 2).reshape(2, 12)
    bias = torch.zeros(12)
    xd = x.double().requires_grad_()
    expected = torch.nn.functional.gelu(xd, approximate="tanh")
    (grad,) = torch.autograd.grad(expected.sum(), xd)
    got = bias_gelu(x, bias, "tanh", backend="native")
    dx, _ = torch.ops.vitkernels.bias_gelu_backward(torch.ones_like(x), x, bias, "tanh")
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dx.double(), grad, rtol=1e-6, atol=1e-7)


def test_rows_split_across_threads():
    """200 rows of 512 are two tasks of the backward's column sums (Swin-T's deep stages are a few hundred rows)."""
    native_or_skip("bias_gelu")
    fast = lambda x, b, a: bias_gelu(x, b, a, backend="native")  # noqa: E731
    check_against_reference(fast, reference_bias_gelu, make_inputs((2, 100, 512), "none"), torch.float32)
    check_split_across_threads(fast, make_inputs((2, 100, 512), "none"))


def test_matches_torch_gelu_of_a_linear():
    """What the fast MLP relies on: gelu(x W^T + b) == bias_gelu(x W^T, b)."""
    native_or_skip("bias_gelu")
    fc1 = torch.nn.Linear(24, 40)
    x = torch.randn(3, 7, 24)
    expected = torch.nn.functional.gelu(fc1(x))
    assert_close(bias_gelu(torch.nn.functional.linear(x, fc1.weight), fc1.bias, backend="native"), expected)


def test_inplace_variant():
    native_or_skip("bias_gelu")
    x = torch.randn(4, 6, 40)
    b = torch.randn(40)
    expected = bias_gelu(x, b, backend="native")
    y = x.clone()
    torch.ops.vitkernels.bias_gelu_(y, b, "none")
    assert torch.equal(y, expected)
    strided = x.clone().transpose(0, 1)  # not contiguous: computed aside and copied back
    torch.ops.vitkernels.bias_gelu_(strided, b, "none")
    assert torch.equal(strided.transpose(0, 1), expected)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bf16-bias", "fp32-bias"])
@pytest.mark.parametrize("shape", [(2, 9, 96), (3, 37), (300, 33), (1, 1)], ids=str)
def test_native_bfloat16_is_the_float_op_rounded(shape, bias_dtype, isa, monkeypatch):
    """bfloat16 is widened and rounded in the kernel's registers (no whole-tensor conversion, no float copy),
    forward, in place and backward: bitwise the float op on the widened inputs, rounded (NaN and infinities included,
    every vector tail); the bias gradient (summed in float per block of rows, in double across) within float rounding
    of it. An fp32 bias beside bf16 activations is the autocast case."""
    native_or_skip("bias_gelu")
    use_cpu_isa(monkeypatch, isa)
    x = (4 * torch.randn(shape)).bfloat16()
    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])[: x.numel()]
    b = torch.randn(shape[-1]).to(bias_dtype)
    g = torch.randn(shape).bfloat16()
    xf, bf, gf = widen(x, b, g)
    for approximate in ("none", "tanh"):
        want = torch.ops.vitkernels.bias_gelu(xf, bf, approximate)
        assert_bf16_bitwise(torch.ops.vitkernels.bias_gelu(x, b, approximate), want, "bias_gelu")
        y = x.clone()
        torch.ops.vitkernels.bias_gelu_(y, b, approximate)
        assert_bf16_bitwise(y, want, "bias_gelu_")
        finite = x.isfinite()  # the backward on finite inputs (gelu' of inf * 0 is NaN in both, but sums spread it)
        xs = torch.where(finite, x, 0)
        dx, db = torch.ops.vitkernels.bias_gelu_backward(g, xs, b, approximate)
        want_dx, want_db = torch.ops.vitkernels.bias_gelu_backward(gf, xs.float(), bf, approximate)
        assert_bf16_bitwise(dx, want_dx, "bias_gelu_backward dx")
        assert db.dtype == bias_dtype
        assert_close(db.double(), want_db.to(bias_dtype).double(), rtol=1e-2 if bias_dtype == torch.bfloat16 else 1e-5,
                     atol=1e-5)


def test_gradcheck_float64():
    native_or_skip("bias_gelu")
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda x, b: bias_gelu(x, b, approximate, backend="native"), (x, b))


def test_opcheck():
    native_or_skip("bias_gelu")
    x = torch.randn(3, 5, 20, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkernels.bias_gelu.default, (x, b, "none"))
    torch.library.opcheck(torch.ops.vitkernels.bias_gelu.default, (x, b, "tanh"))
    torch.library.opcheck(torch.ops.vitkernels.bias_gelu_.default, (x.detach().clone(), b.detach(), "none"))


def test_compiles_fullgraph():
    native_or_skip("bias_gelu")
    x = torch.randn(2, 5, 32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    fn = torch.compile(lambda x, b: bias_gelu(x, b, backend="native") * 2, backend="aot_eager", fullgraph=True)
    out = fn(x, b)
    out.sum().backward()
    assert_close(out, 2 * reference_bias_gelu(x, b))
    assert x.grad is not None and b.grad is not None


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(3, 4), torch.randn(5)), ValueError, "bias must have shape"),
    ((torch.randn(3, 4), torch.randn(1, 4)), ValueError, "bias must have 1 dimensions"),
    ((torch.randn(3, 4).int(), torch.randn(4)), TypeError, "x must have dtype"),
    ((torch.randn(3, 4), torch.randn(4), "fast"), ValueError, "approximate must be one of"),
])
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        bias_gelu(*args)


def test_native_op_checks_its_arguments():
    native_or_skip("bias_gelu")
    with pytest.raises(RuntimeError, match="bias must be a floating"):
        torch.ops.vitkernels.bias_gelu(torch.randn(3, 4), torch.randn(5), "none")
    with pytest.raises(RuntimeError, match="approximate must be"):
        torch.ops.vitkernels.bias_gelu(torch.randn(3, 4), torch.randn(4), "erf")
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.vitkernels.bias_gelu_backward(torch.randn(3, 5), torch.randn(3, 4), torch.randn(4), "none")


def test_reference_backend_on_request():
    x, b = torch.randn(2, 8), torch.randn(8)
    assert torch.equal(bias_gelu(x, b, backend="reference"), reference_bias_gelu(x, b))
    assert vitkernels.ops.bias_gelu.op.reasons(vitkernels.dispatch.Call(x.device, x.dtype))["reference"] is None
