"""window_attention_add_bias (qkv without the qkv Linear's bias, added by the op): native vs reference (values and
gradients of qkv, table and bias, padding and shifts, every CPU instruction set), gradcheck, opcheck, compile."""
import pytest
import torch

from vitkernels.ops.window_attention import window_attention_add_bias

from fused_ops_helpers import CPU_ISAS, check_against_reference, leaf, native_or_skip, use_cpu_isa

CASES = [  # (B, H, W, num_heads, head_dim, window, shift)
    (2, 14, 14, 2, 16, (7, 7), (3, 3)),
    (1, 9, 10, 3, 5, (7, 7), (3, 3)),    # padding on both axes, shifted, head_dim 5
    (2, 5, 11, 2, 3, (3, 4), (1, 2)),    # non-square window
    (1, 6, 6, 2, 32, (4, 4), (0, 0)),    # padding without shift
]


def make_inputs(case):
    B, H, W, nH, hd, window, shift = case

    def make(dtype):
        gen = torch.Generator().manual_seed(0)
        qkv = torch.randn(B, H, W, 3 * nH * hd, generator=gen, dtype=torch.float64)
        table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), nH, generator=gen, dtype=torch.float64)
        bias = torch.randn(3 * nH * hd, generator=gen, dtype=torch.float64)
        return leaf(qkv, dtype), leaf(table, dtype), window, shift, nH, None, leaf(bias, dtype)
    return make


def native(*args):
    return window_attention_add_bias(*args, backend="native")


def reference(*args):
    return window_attention_add_bias(*args, backend="reference")


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}w{c[5]}s{c[6]}hd{c[4]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_matches_reference(case, dtype):
    native_or_skip("window_attention_add_bias")
    check_against_reference(native, reference, make_inputs(case), dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_every_instruction_set(isa, monkeypatch):
    native_or_skip("window_attention_add_bias")
    use_cpu_isa(monkeypatch, isa)
    check_against_reference(native, reference, make_inputs((1, 9, 10, 2, 16, (7, 7), (3, 3))), torch.float32)


def test_same_as_window_attention_of_the_biased_qkv():
    native_or_skip("window_attention_add_bias")
    from vitkernels.ops.window_attention import window_attention

    qkv, table, window, shift, nH, scale, bias = make_inputs(CASES[1])(torch.float32)
    expected = window_attention(qkv + bias, table, window, shift, nH, scale, bias, backend="native")
    torch.testing.assert_close(native(qkv, table, window, shift, nH, scale, bias), expected, rtol=1e-6, atol=1e-6)


def test_gradcheck_float64():
    native_or_skip("window_attention_add_bias")
    qkv, table, window, shift, nH, scale, bias = make_inputs((1, 5, 6, 2, 3, (4, 4), (2, 1)))(torch.float64)
    assert torch.autograd.gradcheck(lambda q, t, b: native(q, t, window, shift, nH, scale, b), (qkv, table, bias))


@pytest.mark.parametrize("save_probs", [False, True], ids=["lse", "saved-softmax"])
def test_native_opcheck(save_probs):
    native_or_skip("window_attention_add_bias")
    qkv = torch.randn(1, 9, 10, 96, requires_grad=True)
    table = torch.randn(169, 2, requires_grad=True)
    bias = torch.randn(96, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkernels.window_attention_add_bias.default,
                          (qkv, table, bias, [7, 7], [3, 3], 2, 0.25, save_probs))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op_name,with_bias", [("window_attention_add_bias", True), ("window_attention", True),
                                               ("window_attention", False)],
                         ids=["add_bias", "window_attention", "window_attention-no-bias"])
def test_native_saved_softmax_and_recomputed_softmax_give_the_same_gradients(isa, dtype, op_name, with_bias,
                                                                             monkeypatch):
    """The training forward saves P (rows padded with zeros to a multiple of 16 columns) and the backward reads it;
    the lse path recomputes P: the same output, softmax rows, the same gradients (to rounding: one path normalises
    P by 1 / sum, the other recomputes exp(S - lse)). Both native CPU ops (window_attention's qkv_bias is the padded
    tokens' qkv only). Gradients against the reference: the tests above and test_window_attention.py."""
    native_or_skip(op_name)
    use_cpu_isa(monkeypatch, isa)
    forward = getattr(torch.ops.vitkernels, op_name)
    backward = getattr(torch.ops.vitkernels, op_name + "_backward")
    B, H, W, nH, hd, window, shift = 2, 9, 10, 3, 16, [7, 7], [3, 3]
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H, W, 3 * nH * hd, generator=gen).to(dtype)
    table = torch.randn(169, nH, generator=gen).to(dtype)
    bias = torch.randn(3 * nH * hd, generator=gen).to(dtype) if with_bias else None
    grad_out = torch.randn(B, H, W, nH * hd, generator=gen).to(dtype)
    args = (table, bias, window, shift, nH, hd ** -0.5)
    out_lse, lse = forward(qkv, *args, False)
    out_p, probs = forward(qkv, *args, True)
    n_windows, N = B * 2 * 2, 49
    assert lse.shape == (n_windows, nH, N) and probs.shape == (n_windows, nH, N, 64)
    torch.testing.assert_close(out_p, out_lse, rtol=0, atol=0)
    # softmax rows (padded queries' rows too: they attend like any token, their outputs are cropped)
    assert torch.all(probs >= 0) and torch.all(probs[..., N:] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(lse), rtol=1e-5, atol=1e-5)
    grads_lse = backward(grad_out, qkv, table, bias, out_lse, lse, window, shift, nH, hd ** -0.5)
    grads_p = backward(grad_out, qkv, table, bias, out_p, probs, window, shift, nH, hd ** -0.5)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert (grads_p[2].numel() > 0) == with_bias
    for got, expected in zip(grads_p, grads_lse):
        assert got.abs().sum() > 0 or got.numel() == 0
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("save_probs", [False, True], ids=["lse", "saved-softmax"])
def test_native_softmax_state_is_not_differentiable(save_probs):
    """The softmax state is the backward's input, not a differentiable result (the gradient formula has no term for
    it): it does not require grad, so autograd fills no zero gradient for it; the output does."""
    native_or_skip("window_attention_add_bias")
    qkv, table, window, shift, nH, scale, bias = make_inputs(CASES[0])(torch.float32)
    out, state = torch.ops.vitkernels.window_attention_add_bias(qkv, table, bias, list(window), list(shift), nH, 0.25,
                                                                save_probs)
    assert out.requires_grad and not state.requires_grad
    grads = torch.autograd.grad(out.sum(), (qkv, table, bias))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_compiles_fullgraph():
    native_or_skip("window_attention_add_bias")
    qkv, table, window, shift, nH, scale, bias = make_inputs(CASES[0])(torch.float32)
    fn = torch.compile(lambda q, t, b: native(q, t, window, shift, nH, scale, b) * 2, backend="aot_eager",
                       fullgraph=True)
    out = fn(qkv, table, bias)
    out.sum().backward()
    torch.testing.assert_close(out, 2 * reference(qkv, table, window, shift, nH, scale, bias), rtol=1e-4, atol=1e-5)
    assert all(t.grad is not None for t in (qkv, table, bias))


def test_requires_the_bias():
    with pytest.raises(ValueError, match="qkv_bias is required"):
        window_attention_add_bias(torch.randn(1, 7, 7, 12), torch.randn(169, 2), 7, 0, 2, None, None)


# --- vitkernels::window_attention_add_bias_eager: the eager CPU path (a C++ autograd Function) -----------------------

def _op_with_registered_autograd(qkv, table, bias, window, shift, nH, scale):
    out, _ = torch.ops.vitkernels.window_attention_add_bias(qkv, table, bias, window, shift, nH, scale, True)
    return out


def _eager_args(case, dtype, requires=(True, True, True)):
    qkv, table, window, shift, nH, _, bias = make_inputs(case)(dtype)
    qkv, table, bias = (t.detach().clone().requires_grad_(r) for t, r in zip((qkv, table, bias), requires))
    return qkv, table, bias, list(window), list(shift), nH, (qkv.shape[-1] // 3 // nH) ** -0.5


@pytest.mark.parametrize("case", CASES[:2], ids=["14x14s3", "9x10pad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_eager_op_matches_the_op_with_its_registered_autograd(case, dtype):
    """The same kernels, so the same bits: the output and the gradients of qkv, table and bias."""
    native_or_skip("window_attention_add_bias")
    results = []
    for fn in (torch.ops.vitkernels.window_attention_add_bias_eager, _op_with_registered_autograd):
        args = _eager_args(case, dtype)
        out = fn(*args)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
        results.append([out] + [t.grad for t in args[:3]])
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, True)], ids=["qkv", "table+bias"])
def test_eager_op_gives_the_gradients_asked_for(requires):
    native_or_skip("window_attention_add_bias")
    results = []
    for fn in (torch.ops.vitkernels.window_attention_add_bias_eager, _op_with_registered_autograd):
        args = _eager_args(CASES[0], torch.float32, requires)
        fn(*args).pow(2).sum().backward()
        results.append([t.grad for t in args[:3]])
    for got, want, req in zip(*results, requires):
        assert (got is None) == (not req) and (got is None or torch.equal(got, want))


def test_eager_op_without_autograd_runs_the_forward_alone():
    """No graph, the forward without the saved softmax (the lse path): the same output."""
    native_or_skip("window_attention_add_bias")
    from helpers import OpCalls

    qkv, table, bias, window, shift, nH, scale = _eager_args(CASES[1], torch.float32)
    with torch.no_grad(), OpCalls() as calls:
        out = torch.ops.vitkernels.window_attention_add_bias_eager(qkv, table, bias, window, shift, nH, scale)
    assert out.grad_fn is None and calls.names == ["vitkernels::window_attention_add_bias"]
    with torch.no_grad():
        want, _ = torch.ops.vitkernels.window_attention_add_bias(qkv, table, bias, window, shift, nH, scale, False)
    assert torch.equal(out, want)


def test_eager_op_dispatches_the_op():
    """The Function runs the op and its backward through the dispatcher (a dispatch mode sees them; meta tensors get
    the fakes), and a second-order gradient is refused as the op's registered autograd refuses it."""
    native_or_skip("window_attention_add_bias")
    from helpers import OpCalls

    op = torch.ops.vitkernels.window_attention_add_bias_eager
    qkv, table, bias, window, shift, nH, scale = _eager_args(CASES[1], torch.float32)
    with OpCalls() as calls:
        op(qkv, table, bias, window, shift, nH, scale).sum().backward()
    assert calls.names.count("vitkernels::window_attention_add_bias") == 1
    assert calls.names.count("vitkernels::window_attention_add_bias_backward") == 1
    meta = op(qkv.to("meta"), table.to("meta"), bias.to("meta"), window, shift, nH, scale)
    assert meta.device.type == "meta" and meta.shape == (*qkv.shape[:-1], qkv.shape[-1] // 3)
    (grad,) = torch.autograd.grad(op(qkv, table, bias, window, shift, nH, scale).pow(2).sum(), qkv, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward .* native backend of window_attention_add_bias"):
        torch.autograd.grad(grad.pow(2).sum(), qkv)


def test_eager_op_checks_its_arguments():
    native_or_skip("window_attention_add_bias")
    qkv, table, bias, window, shift, nH, scale = _eager_args(CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="window_attention_add_bias"):
        torch.ops.vitkernels.window_attention_add_bias_eager(qkv, table[:5], bias, window, shift, nH, scale)
    with pytest.raises(RuntimeError, match="window_attention_add_bias"):
        torch.ops.vitkernels.window_attention_add_bias_eager(qkv, table, bias[:4], window, shift, nH, scale)
