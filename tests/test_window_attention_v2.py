"""window_attention_v2: the reference op vs timm's V2 block attention, gradients, argument errors; the fast backends
(native CPU, Triton under the interpreter) vs the float64 reference."""
import math

import pytest
import torch

import vitkernels
from vitkernels.reference import window_attention_v2 as reference

from helpers import import_timm, needs_padded_shift, skip_unless_timm_swinv2_pads

CASES = [  # (B, H, W, num_heads, head_dim, window, shift)
    (2, 14, 14, 2, 4, (7, 7), (3, 3)),
    (1, 9, 10, 3, 5, (7, 7), (3, 3)),   # padding on both axes, shifted
    (2, 5, 11, 2, 3, (3, 4), (1, 2)),   # non-square window
    (1, 8, 8, 1, 8, (8, 8), (0, 0)),    # one window
    (1, 12, 9, 2, 4, (4, 4), (2, 0)),   # shift on one axis only
    (1, 6, 6, 2, 4, (4, 4), (0, 0)),    # padding without shift
]
CASE_IDS = [f"b{c[0]}-{c[1]}x{c[2]}w{c[5]}s{c[6]}h{c[3]}hd{c[4]}" for c in CASES]


def make_inputs(case, dtype=torch.float64, device="cpu", with_bias=True, seed=0, zero_k_bias=True):
    """qkv, bias table (in (0, 16) like 16 * sigmoid), per-head scale (one head at the clamp, 100), qkv bias with a
    zero k part (timm's k_bias) unless ``zero_k_bias=False`` (gradcheck: a zero key is where F.normalize's eps clamp
    makes the function non-differentiable)."""
    B, H, W, nH, hd, window, shift = case
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3 * nH * hd, generator=gen, dtype=torch.float64)
    table = 16 * torch.rand((2 * window[0] - 1) * (2 * window[1] - 1), nH, generator=gen, dtype=torch.float64)
    scale = torch.exp(torch.rand(nH, generator=gen, dtype=torch.float64) * math.log(100))
    scale[-1] = 100.0
    bias = None
    if with_bias:
        bias = torch.randn(3 * nH * hd, generator=gen, dtype=torch.float64)
        if zero_k_bias:
            bias[nH * hd:2 * nH * hd] = 0
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (qkv, table, scale, bias)]


@pytest.mark.parametrize("res,window,shift", [((14, 14), (7, 7), (3, 3)), ((9, 10), (7, 7), (3, 3)),
                                              ((10, 13), (3, 4), (1, 2))], ids=["shifted", "padded", "non-square"])
def test_reference_op_plus_timm_linears_equals_timm_block_attention(res, window, shift):
    """The op between timm's qkv Linear (with cat(q_bias, 0, v_bias)) and proj is timm's whole _attn, for shifted,
    padded and non-square cases."""
    import_timm()
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    skip_unless_timm_swinv2_pads(needs_padded_shift(res, window, shift))
    block = SwinTransformerV2Block(24, res, 3, window_size=window, shift_size=shift).double()
    assert (block.window_size, block.shift_size) == (window, shift)
    attn = block.attn
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
        attn.logit_scale.uniform_(0, 6)
    x = torch.randn(2, *res, 24, dtype=torch.float64)
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    table = reference.continuous_position_bias_table(attn.cpb_mlp, attn.relative_coords_table, attn.num_heads)
    out = attn.proj(vitkernels.window_attention_v2(
        torch.nn.functional.linear(x, attn.qkv.weight, qkv_bias), table, reference.cosine_scale(attn.logit_scale),
        block.window_size, block.shift_size, attn.num_heads, qkv_bias, backend="reference"))
    torch.testing.assert_close(out, block._attn(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window,pretrained", [((8, 8), (0, 0)), ((3, 5), (0, 0)), ((16, 16), (12, 12)),
                                               ((1, 4), (0, 0))])
def test_relative_coords_table_matches_timm(window, pretrained):
    timm = import_timm()
    from timm.models.swin_transformer_v2 import WindowAttention

    theirs = WindowAttention(8, window, 2, pretrained_window_size=pretrained)
    ours = reference.relative_coords_table(window, pretrained)
    assert ours.isfinite().all()
    if 1 in window and not theirs.relative_coords_table.isfinite().all():
        # a window of 1 on an axis has the one relative coordinate 0: timm >= 1.0.31 divides it by max(w - 1, 1),
        # timm 1.0.29 by w - 1 = 0 (NaN coordinates, NaN bias)
        pytest.skip(f"timm {timm.__version__} lacks the window-of-1 guard of Swin V2's relative_coords_table "
                    "(0 / 0 = NaN; timm >= 1.0.31 divides by max(w - 1, 1))")
    assert torch.equal(ours, theirs.relative_coords_table)


def test_reference_gradients():
    case = (1, 5, 6, 2, 3, (4, 4), (2, 1))
    inputs = tuple(t.requires_grad_() for t in make_inputs(case, zero_k_bias=False))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: vitkernels.window_attention_v2(a, b, c, (4, 4), (2, 1), 2, qkv_bias=d, backend="reference"),
        inputs, fast_mode=True,
    )


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(qkv=a["qkv"][0]), ValueError, "qkv must have 4 dimensions"),
        (lambda a: a.update(qkv=a["qkv"].int()), TypeError, "qkv must have dtype"),
        (lambda a: a.update(num_heads=5), ValueError, "3 \\* num_heads \\* head_dim"),
        (lambda a: a.update(num_heads=0), ValueError, "num_heads must be >= 1"),
        (lambda a: a.update(bias_table=a["bias_table"][:-1]), ValueError, "bias_table must have shape"),
        (lambda a: a.update(scale=a["scale"][:1]), ValueError, "scale must have shape"),
        (lambda a: a.update(scale=1.0), TypeError, "scale must be a torch.Tensor"),
        (lambda a: a.update(window_size=0), ValueError, "window_size must be positive"),
        (lambda a: a.update(shift_size=7), ValueError, "shift_size must be smaller"),
        (lambda a: a.update(qkv_bias=torch.randn(5)), ValueError, "qkv_bias must have shape"),
        (lambda a: a.update(bias_table=a["bias_table"].to("meta")), ValueError, "on one device"),
    ],
)
def test_bad_inputs(mutate, exc, match):
    qkv, table, scale, bias = make_inputs((1, 9, 10, 2, 4, (7, 7), (3, 3)), dtype=torch.float32)
    args = dict(qkv=qkv, bias_table=table, scale=scale, window_size=7, shift_size=3, num_heads=2, qkv_bias=bias)
    mutate(args)
    with pytest.raises(exc, match=match):
        vitkernels.window_attention_v2(args["qkv"], args["bias_table"], args["scale"], args["window_size"],
                                       args["shift_size"], args["num_heads"], args["qkv_bias"])


# === fast backends vs the float64 reference ======================================================================

from vitkernels import _native  # noqa: E402


def run_forward_backward(case, dtype, backend, param_dtype=None, with_bias=True, grad=None, device="cpu",
                         zero_k_bias=True):
    """Forward and the gradients of (qkv, bias_table, scale, qkv_bias) of one case (fixed random inputs)."""
    B, H, W, nH, hd, window, shift = case
    qkv, table, scale, bias = make_inputs(case, with_bias=with_bias, zero_k_bias=zero_k_bias)
    qkv = qkv.to(device=device, dtype=dtype).requires_grad_()
    params = [t.to(device=device, dtype=param_dtype or dtype).requires_grad_() if t is not None else None
              for t in (table, scale, bias)]
    out = vitkernels.window_attention_v2(qkv, params[0], params[1], window, shift, nH, qkv_bias=params[2],
                                         backend=backend)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    leaves = [t for t in [qkv] + params if t is not None]
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out, grads, grad, leaves


def check_against_reference(case, dtype, backend, param_dtype=None, with_bias=True, device="cpu", error_ratio=2.0,
                            zero_k_bias=True, ratio_overrides=None):
    """The fast backend vs the float64 reference (fp32 for half inputs). For half inputs the error is bounded by
    ``error_ratio`` (``ratio_overrides[name]`` for the named results) x eager PyTorch's own error in that dtype
    (flash-attn's rule) plus 1e-3 of the magnitude."""
    kw = dict(with_bias=with_bias, device=device, zero_k_bias=zero_k_bias)
    out, grads, grad, leaves = run_forward_backward(case, dtype, backend, param_dtype, **kw)
    ref_dtype = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    ref_out, ref_grads, _, _ = run_forward_backward(case, ref_dtype, "reference", grad=grad, **kw)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]
    if dtype in (torch.float32, torch.float64):
        tol = 1e-10 if dtype == torch.float64 else 1e-4  # the fp32 logits are scale (up to 100) x a cosine
        torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol / 2)
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * max(1.0, rg.abs().max().item()),
                                       msg=f"grad {i}")
        return
    eager_out, eager_grads, _, _ = run_forward_backward(case, dtype, "reference", param_dtype, grad=grad, **kw)
    for name, ours, eager, ref in [("out", out, eager_out, ref_out)] + [
        (f"grad{i}", g, eg, rg) for i, (g, eg, rg) in enumerate(zip(grads, eager_grads, ref_grads))
    ]:
        our_err = (ours.float() - ref).abs().max().item()
        eager_err = (eager.float() - ref).abs().max().item()
        ratio = (ratio_overrides or {}).get(name, error_ratio)
        bound = ratio * eager_err + 1e-3 * max(1.0, ref.abs().max().item())
        assert our_err <= bound, f"{name}: error {our_err:.3g} > {error_ratio} x eager {eager_err:.3g} (+atol)"


def native_or_skip(device="cpu"):
    reason = vitkernels.ops.window_attention_v2.op.reasons(
        vitkernels.dispatch.Call(torch.device(device), torch.float32))["native"]
    if reason is not None:
        pytest.skip(reason)


NATIVE_CASES = CASES + [
    (2, 16, 16, 3, 32, (8, 8), (4, 4)),    # swinv2_tiny_window8 stage 1 layout (smaller image)
    (1, 8, 8, 12, 32, (8, 8), (0, 0)),     # stage 3: 12 heads, one window
    (1, 17, 20, 2, 32, (16, 16), (8, 8)),  # window 16 (N = 256), padding on both axes
    (1, 13, 12, 1, 16, (12, 12), (6, 6)),  # window 12, padding
    (3, 4, 4, 2, 24, (4, 4), (0, 0)),      # head_dim not a multiple of 16
]
from fused_ops_helpers import CPU_ISAS, use_cpu_isa  # noqa: E402


@pytest.mark.parametrize("case", NATIVE_CASES, ids=[f"b{c[0]}-{c[1]}x{c[2]}w{c[5]}s{c[6]}h{c[3]}hd{c[4]}"
                                                    for c in NATIVE_CASES])
def test_native_fp32_matches_reference(case):
    native_or_skip()
    check_against_reference(case, torch.float32, "native")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", [CASES[1], (1, 13, 12, 1, 16, (12, 12), (6, 6)), (1, 9, 10, 2, 24, (7, 7), (3, 3))],
                         ids=["pad-shift-hd5", "w12-N144", "hd24"])
def test_native_every_instruction_set_matches_reference(case, isa, monkeypatch):
    """Compiled for AVX-512, AVX2 and the baseline as V1; VITKERNELS_CPU_ISA caps the choice for both ops."""
    native_or_skip()
    use_cpu_isa(monkeypatch, isa)
    check_against_reference(case, torch.float32, "native")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["same", "fp32-params"])
@pytest.mark.parametrize("case", [CASES[1], (2, 16, 16, 3, 32, (8, 8), (4, 4))], ids=["pad-shift", "16x16hd32"])
def test_native_half_matches_reference(case, dtype, param_dtype):
    """Half storage, fp32 math: within 2x eager PyTorch's own error in that dtype. A non-zero k bias: a zero key's
    gradient is divided by F.normalize's eps (1e-12), beyond fp16's range in any implementation."""
    native_or_skip()
    check_against_reference(case, dtype, "native", param_dtype=param_dtype, zero_k_bias=False)


def test_native_without_qkv_bias():
    native_or_skip()
    check_against_reference(CASES[1], torch.float32, "native", with_bias=False)


def test_native_float64_matches_reference_tightly():
    native_or_skip()
    check_against_reference((1, 17, 20, 2, 32, (16, 16), (8, 8)), torch.float64, "native")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", [(1, 5, 6, 2, 3, (4, 4), (2, 1)), (2, 4, 7, 1, 4, (3, 3), (0, 0))],
                         ids=["pad-shift", "pad-noshift"])
def test_native_gradcheck_float64(case, isa, monkeypatch):
    native_or_skip()
    use_cpu_isa(monkeypatch, isa)
    B, H, W, nH, hd, window, shift = case
    inputs = tuple(t.requires_grad_() for t in make_inputs(case, zero_k_bias=False))
    assert torch.autograd.gradcheck(  # full Jacobians for the best ISA, random projections (fast mode) for the rest
        lambda a, b, c, d: vitkernels.window_attention_v2(a, b, c, window, shift, nH, qkv_bias=d, backend="native"),
        inputs, fast_mode=isa != "avx512",
    )


def test_native_zero_key_gradient_follows_f_normalize():
    """timm's padded keys are exactly zero (k_bias = 0): F.normalize's eps clamp decides their gradient; the fused
    backward follows it (dk = tau * G / eps), so the k part of the qkv-bias gradient matches the reference too."""
    native_or_skip()
    check_against_reference(CASES[1], torch.float64, "native", zero_k_bias=True)


def test_native_softmax_state_is_not_differentiable():
    """The op's row log-sum-exp is the backward's input, not a differentiable result: it does not require grad (no
    zero gradient is allocated for it on every backward); the output does."""
    native_or_skip()
    inputs = make_inputs((1, 9, 10, 2, 16, (7, 7), (3, 3)), dtype=torch.float32, zero_k_bias=False)
    qkv, table, scale, bias = (t.requires_grad_() for t in inputs)
    out, lse = torch.ops.vitkernels.window_attention_v2(qkv, table, scale, bias, [7, 7], [3, 3], 2)
    assert out.requires_grad and not lse.requires_grad
    grads = torch.autograd.grad(out.pow(2).sum(), (qkv, table, scale, bias))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("save_probs", [False, True], ids=["lse", "saved-softmax"])
def test_native_opcheck(save_probs):
    native_or_skip()
    qkv, table, scale, bias = make_inputs((1, 9, 10, 2, 16, (7, 7), (3, 3)), dtype=torch.float32, zero_k_bias=False)
    for b in (bias, None):
        args = (qkv.requires_grad_(), table.requires_grad_(), scale.requires_grad_(),
                b.requires_grad_() if b is not None else None, [7, 7], [3, 3], 2, save_probs)
        torch.library.opcheck(torch.ops.vitkernels.window_attention_v2.default, args)
        with torch.no_grad():
            out, lse = torch.ops.vitkernels.window_attention_v2(*args)
        torch.library.opcheck(torch.ops.vitkernels.window_attention_v2_backward.default,
                              (torch.randn_like(out), qkv.detach(), table.detach(), scale.detach(),
                               b.detach() if b is not None else None, out, lse, [7, 7], [3, 3], 2))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_saved_softmax_and_recomputed_softmax_give_the_same_gradients(isa, dtype, with_bias, monkeypatch):
    """The training forward saves P (rows padded with zeros to a multiple of 16 columns) and the backward reads it;
    the lse path recomputes P: the same output and softmax rows, the same gradients (to rounding: one path normalises
    P by 1 / sum, the other recomputes exp(S - lse)). Gradients against the reference: the tests above."""
    native_or_skip()
    use_cpu_isa(monkeypatch, isa)
    case = (2, 9, 10, 3, 16, (7, 7), (3, 3))
    qkv, table, scale, bias = make_inputs(case, dtype=dtype, with_bias=with_bias, zero_k_bias=False)
    grad_out = torch.randn(2, 9, 10, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = (table, scale, bias, [7, 7], [3, 3], 3)
    out_lse, lse = torch.ops.vitkernels.window_attention_v2(qkv, *args, False)
    out_p, probs = torch.ops.vitkernels.window_attention_v2(qkv, *args, True)
    n_windows, N = 2 * 2 * 2, 49
    assert lse.shape == (n_windows, 3, N) and probs.shape == (n_windows, 3, N, 64)
    torch.testing.assert_close(out_p, out_lse, rtol=0, atol=0)
    assert torch.all(probs >= 0) and torch.all(probs[..., N:] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(lse), rtol=1e-5, atol=1e-5)
    grads_lse = torch.ops.vitkernels.window_attention_v2_backward(grad_out, qkv, *args[:3], out_lse, lse, *args[3:])
    grads_p = torch.ops.vitkernels.window_attention_v2_backward(grad_out, qkv, *args[:3], out_p, probs, *args[3:])
    # tau up to 100 makes S (and its rounding) large; the scale's gradient sums every window's q^ . G
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    assert (grads_p[3].numel() > 0) == with_bias
    for got, expected in zip(grads_p, grads_lse):
        assert got.abs().sum() > 0 or got.numel() == 0
        scale_of = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * scale_of)


def test_native_training_saves_the_softmax_on_cpu():
    """Training on CPU keeps the softmax (windows, heads, N, NP) for the backward instead of the row lse; inference
    keeps neither. The gradients through it match the float64 reference."""
    native_or_skip()
    inputs = make_inputs((1, 9, 10, 2, 16, (7, 7), (3, 3)), dtype=torch.float32, zero_k_bias=False)
    qkv, table, scale, bias = (t.requires_grad_() for t in inputs)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = vitkernels.window_attention_v2(qkv, table, scale, 7, 3, 2, qkv_bias=bias, backend="native")
    assert (4, 2, 49, 64) in saved and (4, 2, 49) not in saved
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (qkv, table, scale, bias), grad)
    inputs64 = [t.detach().double().requires_grad_() for t in (qkv, table, scale, bias)]
    out64 = reference.window_attention_v2(*inputs64[:3], (7, 7), (3, 3), 2, inputs64[3])
    expected = torch.autograd.grad(out64, inputs64, grad.double())
    torch.testing.assert_close(out, out64.float(), rtol=1e-4, atol=1e-4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-3, atol=1e-3 * max(1.0, e.abs().max().item()))
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.no_grad():
        vitkernels.window_attention_v2(qkv, table, scale, 7, 3, 2, qkv_bias=bias, backend="native")
    assert saved == []


def assert_v2_block_compiles_fullgraph(backend, device, compiler, tol):
    """A SwinV2Block on ``backend`` compiled with fullgraph=True: forward, input and parameter gradients equal the
    reference block's (same weights)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = vitkernels.SwinV2Block(32, (9, 10), 2, window_size=7, shift_size=3, backend=backend).to(device)
    with torch.no_grad():
        for p in (block.attn.q_bias, block.attn.v_bias):
            p.normal_()
    ref = vitkernels.SwinV2Block(32, (9, 10), 2, window_size=7, shift_size=3, backend="reference").to(device)
    ref.load_state_dict(block.state_dict())
    x = torch.randn(1, 9, 10, 32, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    out = compiled(x)
    out.sum().backward()
    expected = ref(x_ref)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_native_swin_v2_block_compiles_fullgraph(compiler):
    native_or_skip()
    assert_v2_block_compiles_fullgraph("native", "cpu", compiler, 1e-4)


def test_native_is_the_cpu_default():
    native_or_skip()
    call = vitkernels.dispatch.Call(torch.device("cpu"), torch.float32, {"head_dim": 32, "tokens_per_window": 64})
    assert vitkernels.ops.window_attention_v2.op.auto_choice(call)[0] == "native"


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(qkv=torch.randn(1, 8, 8, 95)), "is not 3 \\* num_heads \\* head_dim"),
        (dict(bias_table=torch.randn(224, 1)), "relative_position_bias_table must be"),
        (dict(scale=torch.randn(2)), "scale must be \\(1\\)"),
        (dict(window_size=[8, 8, 8]), "window_size must be a pair"),
        (dict(shift_size=[8, 0]), "0 <= shift < window_size"),
        (dict(qkv_bias=torch.randn(5)), "qkv_bias must be"),
    ],
)
def test_native_op_checks_its_arguments(args, match):
    """The C++ op (reachable without the Python checks through torch.ops) refuses bad arguments with a message."""
    native_or_skip()
    call = dict(qkv=torch.randn(1, 8, 8, 96), bias_table=torch.randn(225, 1), scale=torch.ones(1), qkv_bias=None,
                window_size=[8, 8], shift_size=[4, 4], num_heads=1)
    call.update(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vitkernels.window_attention_v2(call["qkv"], call["bias_table"], call["scale"], call["qkv_bias"],
                                                 call["window_size"], call["shift_size"], call["num_heads"])


# === Triton kernels (CPU interpreter on tiny shapes; CUDA when present) ==========================================

from helpers import triton_interpreter_or_cuda  # noqa: E402

TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_CASES = [  # (B, H, W, num_heads, head_dim, window, shift)
    (1, 9, 10, 2, 16, (7, 7), (3, 3)),     # padding (qkv-bias tokens, zero k bias), shifted
    (2, 5, 11, 1, 16, (3, 4), (1, 2)),     # non-square window, several images
    (1, 12, 9, 1, 16, (4, 4), (2, 0)),     # shift on one axis only
    (1, 8, 8, 1, 32, (8, 8), (0, 0)),      # one window, head_dim 32
    (1, 13, 12, 1, 16, (12, 12), (6, 6)),  # ws 12: N = 144 > one query tile (dQ and dK / dV kernels), padding
]
TRITON_SINGLE_WINDOW_CASES = [  # one window each, so the interpreter stays fast
    (1, 16, 16, 1, 32, (16, 16), (8, 8)),  # N = 256, swinv2 window 16
]


@pytest.mark.parametrize("case", TRITON_CASES + TRITON_SINGLE_WINDOW_CASES,
                         ids=[f"{c[1]}x{c[2]}w{c[5]}s{c[6]}hd{c[4]}" for c in TRITON_CASES + TRITON_SINGLE_WINDOW_CASES])
def test_triton_fp32_matches_reference(case):
    triton_interpreter_or_cuda(TRITON_DEV)
    check_against_reference(case, torch.float32, "triton", device=TRITON_DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["same", "fp32-params"])
def test_triton_half_matches_reference(dtype, param_dtype):
    triton_interpreter_or_cuda(TRITON_DEV)
    # The interpreter truncates fp32 -> bf16 casts instead of rounding: up to ~2x the rounding error, so the CPU
    # bound is 3x eager PyTorch's error; on CUDA flash-attn's 2x. The scale gradient (grad2) sums dS * cos over the
    # window, terms that largely cancel; the truncated bf16 output O biases every delta = dO . O the same way, a
    # systematic error the sum keeps (measured ~4.5x eager's here; fp32 math on the rounded inputs alone is ~1.3x).
    interpreted_bf16 = TRITON_DEV == "cpu" and dtype == torch.bfloat16
    check_against_reference(TRITON_CASES[0], dtype, "triton", param_dtype=param_dtype, device=TRITON_DEV,
                            error_ratio=2.0 if TRITON_DEV == "cuda" else 3.0, zero_k_bias=False,
                            ratio_overrides={"grad2": 6.0} if interpreted_bf16 else None)


def test_triton_without_qkv_bias():
    triton_interpreter_or_cuda(TRITON_DEV)
    check_against_reference(TRITON_CASES[0], torch.float32, "triton", with_bias=False, device=TRITON_DEV)


def test_triton_opcheck():
    """Forward and backward custom ops (on a GPU: the triton_op / wrap_triton path torch.compile traces)."""
    triton_interpreter_or_cuda(TRITON_DEV)
    # one padded, shifted 4x4 window of one head: opcheck runs the ops ~40 times under the interpreter, each program
    # op by op (4 windows x 2 heads: ~8 s); the numbers are the other tests'
    qkv, table, scale, bias = make_inputs((1, 3, 4, 1, 16, (4, 4), (2, 2)), dtype=torch.float32,
                                          device=TRITON_DEV, zero_k_bias=False)
    for b in (bias, None):
        args = (qkv.requires_grad_(), table.requires_grad_(), scale.requires_grad_(),
                b.requires_grad_() if b is not None else None, [4, 4], [2, 2], 1)
        torch.library.opcheck(torch.ops.vitkernels.triton_window_attention_v2.default, args)
        with torch.no_grad():
            out, lse = torch.ops.vitkernels.triton_window_attention_v2(*args)
        torch.library.opcheck(torch.ops.vitkernels.triton_window_attention_v2_backward.default,
                              (torch.randn_like(out), qkv.detach(), table.detach(), scale.detach(),
                               b.detach() if b is not None else None, out, lse, [4, 4], [2, 2], 1))


def test_triton_swin_v2_block_compiles_fullgraph():
    """fullgraph compile of a V2 block on the Triton op, forward and backward: inductor on a GPU, aot_eager under
    the interpreter (inductor cannot trace the interpreter's data-pointer-based launches)."""
    triton_interpreter_or_cuda(TRITON_DEV)
    assert_v2_block_compiles_fullgraph("triton", TRITON_DEV, "inductor" if TRITON_DEV == "cuda" else "aot_eager",
                                       1e-4)


def test_triton_unsupported_configurations_fall_back_with_reasons():
    call = vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, {"head_dim": 24, "tokens_per_window": 64})
    reason = vitkernels.ops.window_attention_v2.op.reasons(call)["triton"]
    assert reason is not None and ("head_dim 24" in reason or "triton" in reason.lower())


CUDA_CASES = [  # swinv2_tiny_window8_256 stages 1 and 3, swinv2_base_window16 stage 1 (scaled batch), padding
    (4, 64, 64, 3, 32, (8, 8), (4, 4)),
    (8, 16, 16, 12, 32, (8, 8), (4, 4)),
    (2, 64, 64, 4, 32, (16, 16), (8, 8)),
    (2, 30, 27, 2, 64, (8, 8), (4, 4)),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[f"{c[1]}x{c[2]}w{c[5]}s{c[6]}hd{c[4]}" for c in CUDA_CASES])
def test_triton_cuda_matches_reference(case, dtype):
    check_against_reference(case, dtype, "triton", device="cuda", zero_k_bias=dtype == torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[f"{c[1]}x{c[2]}w{c[5]}s{c[6]}hd{c[4]}" for c in CUDA_CASES])
def test_native_cuda_matches_reference(case, dtype):
    native_or_skip("cuda")
    check_against_reference(case, dtype, "native", device="cuda", zero_k_bias=dtype == torch.float32)


def test_native_cuda_limits_are_reported_before_the_call():
    """The CUDA kernel's limits (N <= 256, head_dim <= 128) are support checks: auto falls back with the reason."""
    if not _native.is_loaded():
        pytest.skip(_native.IMPORT_ERROR)
    op = vitkernels.ops.window_attention_v2.op
    big = vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, {"head_dim": 32, "tokens_per_window": 289})
    wide = vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, {"head_dim": 160, "tokens_per_window": 64})
    reasons = op.reasons(big)["native"], op.reasons(wide)["native"]
    if _native.has_kernel("window_attention_v2", "CUDA"):
        assert "at most 256 tokens" in reasons[0] and "head_dim <= 128" in reasons[1]
    else:
        assert all("CUDA" in r or "window_attention_v2" in r for r in reasons)
