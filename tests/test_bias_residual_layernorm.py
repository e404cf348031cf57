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


# --- vitkernels::bias_residual_layernorm_eager: the eager CPU path (a C++ autograd Function) -------------------------

def _op_with_registered_autograd(y, b, r, s, w, lb, eps):
    x1, out, _, _ = torch.ops.vitkernels.bias_residual_layernorm(y, b, r, s, w, lb, eps)
    return x1, out


def _leaves(tensors, requires):
    return [None if t is None else t.detach().clone().requires_grad_(req) for t, req in zip(tensors, requires)]


@pytest.mark.parametrize("grads_to", ["both", "x1", "out"])
@pytest.mark.parametrize("with_bias, with_scale, affine", [
    (True, True, True), (True, False, True), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_eager_op_matches_the_op_with_its_registered_autograd(dtype, with_bias, with_scale, affine, grads_to):
    """The same kernels, so the same bits: both outputs and every input's gradient, with each optional argument given
    or not, the gradient reaching x1, the normalised output, or both."""
    native_or_skip("bias_residual_layernorm")
    y, b, r, w, lb, eps, s = make_inputs((3, 5, 40), with_bias, with_scale, affine)(dtype)
    gen = torch.Generator().manual_seed(1)
    g1, g2 = (torch.randn(3, 5, 40, generator=gen).to(dtype) for _ in range(2))
    results = []
    for fn in (torch.ops.vitkernels.bias_residual_layernorm_eager, _op_with_registered_autograd):
        leaves = _leaves((y, b, r, w, lb), (True,) * 5)
        x1, out = fn(leaves[0], leaves[1], leaves[2], s, leaves[3], leaves[4], eps)
        outputs, grads = {"both": ((x1, out), (g1, g2)), "x1": ((x1,), (g1,)), "out": ((out,), (g2,))}[grads_to]
        torch.autograd.backward(outputs, grads)
        results.append([x1, out] + [t.grad for t in leaves if t is not None])
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("requires", [(False, False, True, False, False), (True, False, False, False, False),
                                      (False, True, False, True, False)], ids=["residual", "y", "bias+weight"])
def test_eager_op_gives_only_the_gradients_asked_for(requires):
    native_or_skip("bias_residual_layernorm")
    y, b, r, w, lb, eps, s = make_inputs((2, 6, 24))(torch.float32)
    results = []
    for fn in (torch.ops.vitkernels.bias_residual_layernorm_eager, _op_with_registered_autograd):
        leaves = _leaves((y, b, r, w, lb), requires)
        x1, out = fn(leaves[0], leaves[1], leaves[2], s, leaves[3], leaves[4], eps)
        (x1.sum() + out.pow(2).sum()).backward()
        results.append([t.grad for t in leaves])
    for got, want, req in zip(*results, requires):
        assert (got is None) == (not req) and (got is None or torch.equal(got, want))


def test_eager_op_records_nothing_without_autograd():
    native_or_skip("bias_residual_layernorm")
    y, b, r, w, lb, eps, s = make_inputs((2, 6, 24))(torch.float32)
    with torch.no_grad():
        x1, out = torch.ops.vitkernels.bias_residual_layernorm_eager(y, b, r, s, w, lb, eps)
    want = _op_with_registered_autograd(*(t.detach() if t is not None else None for t in (y, b, r, s, w, lb)), eps)
    assert x1.grad_fn is None and out.grad_fn is None
    assert torch.equal(x1, want[0]) and torch.equal(out, want[1])


def test_eager_op_checks_its_arguments():
    native_or_skip("bias_residual_layernorm")
    op = torch.ops.vitkernels.bias_residual_layernorm_eager
    y = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight and ln_bias must be"):
        op(y, None, y, None, torch.randn(5), None, 1e-5)
    with pytest.raises(RuntimeError, match="residual must be"):
        op(y, None, torch.randn(3, 5), None, None, None, 1e-5)



def test_eager_op_dispatches_the_op():
    """The Function runs vitkernels::bias_residual_layernorm (and its backward) through the dispatcher: a dispatch mode
    sees them, and meta tensors get the op's fake kernel."""
    native_or_skip("bias_residual_layernorm")
    from helpers import OpCalls

    op = torch.ops.vitkernels.bias_residual_layernorm_eager
    y, b, r, w, lb, eps, s = make_inputs((2, 6, 24))(torch.float32)
    with OpCalls() as calls:
        x1, out = op(y, b, r, s, w, lb, eps)
        (x1.sum() + out.sum()).backward()
    assert calls.names.count("vitkernels::bias_residual_layernorm") == 1
    assert calls.names.count("vitkernels::bias_residual_layernorm_backward") == 1
    meta = torch.empty(3, 5, 8, device="meta")
    x1, out = op(meta, None, meta, None, torch.empty(8, device="meta"), None, 1e-5)
    assert x1.device.type == "meta" and out.shape == (3, 5, 8)


def test_fused_blocks_take_the_eager_op_in_eager_training(monkeypatch):
    """A fused Swin block's training step records its two seams through the C++ autograd Function (eager CPU); the
    block's gradients are the ones the op's registered autograd gives."""
    native_or_skip("bias_residual_layernorm")
    import vitkernels.ops.bias_residual_layernorm as module
    from vitkernels.modules.swin import SwinTransformerStage

    torch.manual_seed(0)
    stage = SwinTransformerStage(dim=32, out_dim=32, input_resolution=(8, 8), depth=2, downsample=False, num_heads=2,
                                 window_size=4)
    x = torch.randn(2, 8, 8, 32)
    calls = []
    eager = module._eager
    monkeypatch.setattr(module, "_eager", lambda *a: calls.append(1) or eager(*a))
    stage(x.requires_grad_()).pow(2).sum().backward()
    assert len(calls) == 3  # block 1: its two seams (the second with block 2's norm1); block 2: its first
    grads = [p.grad.clone() for p in stage.parameters()] + [x.grad.clone()]
    stage.zero_grad()
    x.grad = None
    monkeypatch.setattr(module, "_eager", lambda y, b, r, s, w, lb, eps: _op_with_registered_autograd(y, b, r, s, w,
                                                                                                         lb, eps))
    stage(x).pow(2).sum().backward()
    for got, want in zip(grads, [p.grad for p in stage.parameters()] + [x.grad]):
        assert torch.equal(got, want)
