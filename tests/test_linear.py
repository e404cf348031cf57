"""The linear op (F.linear + optional GELU): reference vs the oneDNN native backend, forward and backward, opcheck,
torch.compile, the nn.Linear drop-in and patch_model's class swap, argument errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import OpCalls
from helpers import assert_close_scaled as _assert_close_scaled
from helpers import import_timm
from vitkernels import dispatch
from vitkernels.compat.timm import patch_linears, patch_model
from vitkernels.modules.linear import Linear
from vitkernels.ops import linear as linear_op
from vitkernels.ops.linear import linear

GELU = {None: None, "gelu": "none", "gelu_tanh": "tanh"}
SHAPES = [  # (x shape, N)
    ((37, 29), 19),         # K not a multiple of 16
    ((2, 5, 48), 96),       # 3D input
    ((3, 4, 7, 33), 20),    # 4D input, odd K
    ((0, 24), 16),          # M = 0
]


def assert_close_scaled(actual, expected, dtype):
    if expected.numel() == 0:  # M = 0: shapes only (and zero weight gradients, which are not empty)
        assert actual.shape == expected.shape
        return
    _assert_close_scaled(actual, expected, dtype)


def onednn_or_skip():
    reason = linear_op.op.reasons(dispatch.Call(torch.device("cpu"), torch.float32))["native"]
    if reason is not None:
        pytest.skip(f"native linear unavailable: {reason}")


def cpp_function_or_skip():
    """Skip unless vitkernels::onednn_linear_eager (the C++ autograd Function of vitkernels._C) is there."""
    onednn_or_skip()
    if not hasattr(torch.ops.vitkernels, "onednn_linear_eager"):
        pytest.skip("vitkernels._C is not built")


def use_eager_path(path, monkeypatch):
    """Pin the native backend's eager autograd path: vitkernels::onednn_linear_eager (the C++ autograd Function of
    vitkernels._C, the default where it is built) with oneDNN's / ATen's products ("native_cpp_function"), the
    Python autograd.Function (without vitkernels._C), or the C++ Function on vitkernels' own GEMM ("own_gemm",
    OWN_GEMM: an AVX2-only AMD CPU)."""
    if path == "python_function":
        onednn_or_skip()
        fn = linear_op._EagerOneDNNLinear.apply
    else:
        cpp_function_or_skip()
        if path == "own_gemm" and not hasattr(torch.ops.vitkernels, "cpu_gemm"):
            pytest.skip("vitkernels._C has no cpu_gemm")
        fn = torch.ops.vitkernels.onednn_linear_eager.default
    monkeypatch.setattr(linear_op, "_eager_linear", fn)
    monkeypatch.setattr(linear_op, "OWN_GEMM", path == "own_gemm")
    return path


@pytest.fixture(params=["native_cpp_function", "python_function", "own_gemm"])
def eager_path(request, monkeypatch):
    """Each eager autograd path of the native backend (use_eager_path)."""
    return use_eager_path(request.param, monkeypatch)


@pytest.fixture(params=["native_cpp_function", "python_function"])
def onednn_eager_path(request, monkeypatch):
    """The eager autograd paths whose products are oneDNN's / ATen's (use_eager_path)."""
    return use_eager_path(request.param, monkeypatch)


def expected64(x, w, b, activation):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return y if activation is None else F.gelu(y, approximate=GELU[activation])


def inputs(shape, N, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = shape[-1]
    x = torch.randn(shape, generator=g).requires_grad_()
    w = (torch.randn(N, K, generator=g) / K ** 0.5).requires_grad_()
    b = torch.randn(N, generator=g).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,N", SHAPES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_forward_backward_match_float64(backend, shape, N, bias, activation):
    if backend == "native":
        onednn_or_skip()
    check_forward_backward(backend, shape, N, bias, activation)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,N", SHAPES)
def test_each_eager_path_matches_float64(eager_path, shape, N, bias):
    check_forward_backward("native", shape, N, bias, None)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)],
                         ids=["x-only", "params-only", "bias-only"])
def test_each_eager_path_computes_only_the_gradients_asked_for(eager_path, needs):
    x, w, b = inputs((4, 6, 24), 12, True)
    for t, need in zip((x, w, b), needs):
        t.requires_grad_(need)
    out = linear(x, w, b, backend="native")
    wanted = [t for t in (x, w, b) if t.requires_grad]
    got = torch.autograd.grad(out.pow(2).sum(), wanted)
    ref = torch.autograd.grad(expected64(x, w, b, None).pow(2).sum(), wanted)
    for g_, r in zip(got, ref):
        assert_close_scaled(g_, r.detach(), torch.float32)


def test_grad_x_through_mm_only_on_avx2_cpus_for_wide_inputs():
    """The input gradient goes to ATen's mm on AVX2-only CPUs (AMD Zen 1-3 where oneDNN is the GEMM) for weights of
    >= GRAD_X_MM_MIN_IN_FEATURES input features, nowhere else (vitkernels/ops/linear.py grad_x_through_mm)."""
    wide = linear_op.GRAD_X_MM_MIN_IN_FEATURES
    assert linear_op.grad_x_through_mm(wide, "AVX2") and linear_op.grad_x_through_mm(4 * wide, "AVX2")
    assert not linear_op.grad_x_through_mm(wide - 1, "AVX2")
    for capability in ("AVX512", "DEFAULT", "ZVECTOR"):
        assert not linear_op.grad_x_through_mm(wide, capability)
    assert linear_op.grad_x_through_mm(wide) == (torch.backends.cpu.get_cpu_capability() == "AVX2")


@pytest.mark.parametrize("route", ["linear", "layer_linear"])
@pytest.mark.parametrize("avx2", [False, True], ids=["other-cpu", "avx2-cpu"])
@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
def test_each_eager_path_takes_the_input_gradient_product_the_rule_picks(onednn_eager_path, route, avx2, wide,
                                                                        monkeypatch):
    """The eager backward's g W runs as ATen's mm exactly where grad_x_through_mm says (an AVX2-only CPU, a weight
    of >= 768 input features), as oneDNN's product on the weight's transposed view elsewhere; every gradient matches
    float64 either way. Through linear() and through layer_linear (the Linear module's and the Swin block's call)."""
    if route == "layer_linear" and onednn_eager_path != "native_cpp_function":
        pytest.skip("layer_linear's direct call is the C++ op")
    monkeypatch.setattr(linear_op, "_AVX2_CPU", avx2)
    monkeypatch.setattr(linear_op, "CPU_GEMM", "onednn")
    K = linear_op.GRAD_X_MM_MIN_IN_FEATURES - (0 if wide else 1)
    x, w, b = inputs((3, 2, K), 24, True)
    with OpCalls() as calls:
        out = linear(x, w, b, backend="native") if route == "linear" else linear_op.layer_linear(x, w, b)
        grads = torch.autograd.grad(out.pow(2).sum(), (x, w, b))
    mm = avx2 and wide
    # forward: one oneDNN product; backward: grad_W = g^T x (mm), grad_x = g W (mm or oneDNN)
    assert calls.names.count("aten::mm") == (2 if mm else 1)
    assert calls.names.count("mkldnn::_linear_pointwise") == (1 if mm else 2)
    ref = torch.autograd.grad(expected64(x, w, b, None).pow(2).sum(), (x, w, b))
    for got, want in zip(grads, ref):
        assert_close_scaled(got, want.detach(), torch.float32)


def test_forward_through_mm_only_on_avx2_cpus_for_mid_size_weights_and_many_rows():
    """The layers' forward product goes to ATen's GEMM on AVX2-only CPUs for K >= 192, N K <= 384 * 1536 and at
    least 512 rows (Swin-T's stages 2 and 3), nowhere else (vitkernels/ops/linear.py forward_through_mm)."""
    rows, K, most = linear_op.FORWARD_MM_MIN_ROWS, linear_op.FORWARD_MM_MIN_IN_FEATURES, linear_op.FORWARD_MM_MAX_WEIGHT
    assert linear_op.forward_through_mm(rows, K, K, "AVX2") and linear_op.forward_through_mm(3136, 384, 1536, "AVX2")
    assert linear_op.forward_through_mm(rows, 1536, 384, "AVX2") and most == 384 * 1536
    assert not linear_op.forward_through_mm(rows - 1, K, K, "AVX2")  # few rows (stage 3 at batch 1)
    assert not linear_op.forward_through_mm(rows, K - 1, K, "AVX2")  # narrow inputs (stage 1's K = 96)
    assert not linear_op.forward_through_mm(rows, 768, 3072, "AVX2")  # large weights (stage 4)
    for capability in ("AVX512", "DEFAULT", "ZVECTOR"):
        assert not linear_op.forward_through_mm(rows, K, K, capability)
    assert linear_op.forward_through_mm(rows, K, K) == (torch.backends.cpu.get_cpu_capability() == "AVX2")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_native_linear_eager_forward_through_aten_keeps_the_backward(bias):
    """onednn_linear_eager(forward_mm=True): the forward is ATen's product (bitwise F.linear's), not oneDNN's; the
    gradients are those of the oneDNN forward's call bitwise (the same backward), and no view of an internal tensor
    comes back (in-place updates of the output, as timm's ``qkv += bias``, stay allowed)."""
    cpp_function_or_skip()
    x, w, b = inputs((4, 3, 200), 72, bias)
    op = torch.ops.vitkernels.onednn_linear_eager
    g = torch.randn(4, 3, 72, generator=torch.Generator().manual_seed(3))
    with OpCalls() as calls:
        y = op(x, w, b, False, True)
    assert "mkldnn::_linear_pointwise" not in calls.names
    assert torch.equal(y, F.linear(x, w, b)) and y._base is None
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    y_onednn = op(x, w, b, False, False)
    want = torch.autograd.grad(y_onednn, [t for t in (x, w, b) if t is not None], g)
    assert all(torch.equal(a, e) for a, e in zip(got, want))
    assert_close_scaled(y, expected64(x, w, b, None).detach(), torch.float32)
    y.add_(1.0)  # allowed: not a view made inside the Function
    with torch.no_grad():
        assert torch.equal(op(x, w, b, False, True), F.linear(x, w, b))


@pytest.mark.parametrize("rows", [512, 511], ids=["many-rows", "few-rows"])
def test_layer_linear_forward_takes_the_product_the_rule_picks(rows, monkeypatch):
    """layer_linear's forward runs ATen's product exactly where forward_through_mm says (an AVX2-only CPU pinned
    here, so that the test runs on every CPU), in training and in inference alike: the same numbers either way."""
    cpp_function_or_skip()
    monkeypatch.setattr(linear_op, "_AVX2_CPU", True)
    monkeypatch.setattr(linear_op, "CPU_GEMM", "onednn")
    monkeypatch.setattr(linear_op, "OWN_GEMM", False)
    x, w, b = inputs((rows, 192), 192, True)
    with OpCalls() as calls:
        y = linear_op.layer_linear(x, w, b)
    assert ("mkldnn::_linear_pointwise" in calls.names) == (rows < 512)
    with torch.no_grad():
        assert torch.equal(linear_op.layer_linear(x, w, b), y.detach())
    assert_close_scaled(y, expected64(x, w, b, None).detach(), torch.float32)


def test_eager_training_uses_the_cpp_function_where_built():
    cpp_function_or_skip()
    assert linear_op._eager_linear is torch.ops.vitkernels.onednn_linear_eager.default
    x, w, b = inputs((5, 16), 8, True)
    assert "EagerOneDnnLinear" in linear(x, w, b, backend="native").grad_fn.name()


def test_layer_linear_goes_straight_to_the_native_op_in_eager_float32(monkeypatch):
    """layer_linear (the Linear module's and the fused Swin block's GEMMs) skips linear()'s Python checks where
    the C++ op serves the call, and is linear(backend="auto") everywhere else: float64, autocast, torch.compile.
    (Where oneDNN is the machine's CPU GEMM: pinned here, so that the test runs on every CPU.)"""
    cpp_function_or_skip()
    monkeypatch.setattr(linear_op, "CPU_GEMM", "onednn")
    x, w, b = inputs((3, 5, 16), 8, True)
    y = linear_op.layer_linear(x, w, b)
    assert "EagerOneDnnLinear" in y.grad_fn.name()
    assert_close_scaled(y, expected64(x, w, b, None).detach(), torch.float32)
    with torch.no_grad():
        y = linear_op.layer_linear(x, w, b)
        assert y.grad_fn is None and y._base is None
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = linear_op.layer_linear(x64, w64, b64)
    assert "EagerOneDnnLinear" not in y64.grad_fn.name() and y64.dtype == torch.float64
    torch.testing.assert_close(y64, F.linear(x64, w64, b64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_op.layer_linear(x, w, b).dtype == torch.bfloat16
    compiled = torch.compile(lambda t: linear_op.layer_linear(t, w, b), backend="aot_eager", fullgraph=True)
    assert_close_scaled(compiled(x), expected64(x, w, b, None).detach(), torch.float32)


def check_forward_backward(backend, shape, N, bias, activation):
    x, w, b = inputs(shape, N, bias)
    out = linear(x, w, b, activation, backend=backend)
    assert out.shape == (*shape[:-1], N) and out.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    ref = expected64(x64, w64, b64, activation)
    assert_close_scaled(out, ref.detach(), torch.float32)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [t for t in (x, w, b) if t is not None]
    params64 = [t for t in (x64, w64, b64) if t is not None]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, params64, grad.double())
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape
        assert_close_scaled(g_, w_, torch.float32)


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_native_op_backward_with_fused_activation(activation):
    """The op itself with the post-op (its backward recomputes the pre-activation); linear() only calls it that way
    without autograd, so this is the path opcheck and direct users take."""
    onednn_or_skip()
    x, w, b = inputs((3, 6, 40), 24, True)
    out = torch.ops.vitkernels.onednn_linear(x, w, b, "none" if activation is None else activation)
    ref = expected64(x, w, b, activation)
    assert_close_scaled(out, ref.detach(), torch.float32)
    got = torch.autograd.grad(out.sum(), (x, w, b))
    want = torch.autograd.grad(ref.sum(), (x, w, b))
    for g_, w_ in zip(got, want):
        assert_close_scaled(g_, w_.detach().float(), torch.float32)


def test_native_relative_error_is_gemm_rounding():
    onednn_or_skip()
    x, w, b = inputs((300, 384), 96, True)
    with torch.no_grad():
        out = linear(x, w, b, backend="native").double()
        ref = expected64(x, w, b, None)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6


def test_non_contiguous_input():
    onednn_or_skip()
    x, w, b = inputs((20, 64), 32, True)
    xt = x.detach().t().contiguous().t()  # column-major view
    w_nc = w.detach().t().contiguous().t()
    assert not xt.is_contiguous() and not w_nc.is_contiguous()
    assert_close_scaled(linear(xt, w_nc, b.detach(), "gelu", backend="native"),
                        expected64(xt, w_nc, b.detach(), "gelu"), torch.float32)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("shape", [(6, 5, 8), (8,)], ids=["3d", "1d"])
def test_eager_output_is_not_a_view_and_can_be_modified_in_place(eager_path, shape, grad):
    # eager calls skip the custom op (oneDNN's op directly / an autograd.Function): their output must still allow
    # in-place updates (timm's ``qkv += bias``), which autograd forbids on a view made inside a Function
    x, w, b = inputs(shape, 6, True)
    with torch.set_grad_enabled(grad):
        y = linear(x, w, b, backend="native")
        assert y._base is None and y.shape == (*shape[:-1], 6)
        y += 1
    want = expected64(x, w, b, None) + 1
    assert_close_scaled(y, want, torch.float32)
    if grad:
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad(y, (x, w, b), g)
        ref = torch.autograd.grad(want, (x, w, b), g.double())
        for a, r in zip(got, ref):
            assert_close_scaled(a, r, torch.float32)


def test_eager_double_backward_matches_f_linear(eager_path):
    # under create_graph the eager Functions' backward runs differentiable ops (the custom op / ATen's mm)
    x, w, b = inputs((7, 12), 5, True)

    def grad_of_grad_norm(fn):
        grads = torch.autograd.grad(fn(x, w, b).pow(2).sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (x, w, b))

    got = grad_of_grad_norm(lambda *a: linear(*a, backend="native"))
    want = grad_of_grad_norm(F.linear)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_layer_linear_is_f_linear_where_aten_is_the_cpu_gemm(monkeypatch):
    """Where ATen's GEMM is the machine's CPU GEMM (an Intel CPU with MKL), layer_linear is F.linear itself: the
    same grad_fn and bitwise the same numbers, forward and backward, with and without autograd."""
    monkeypatch.setattr(linear_op, "CPU_GEMM", "aten")
    x, w, b = inputs((3, 5, 16), 8, True)
    for bias in (b, None):
        y, ref = linear_op.layer_linear(x, w, bias), F.linear(x, w, bias)
        assert y.grad_fn.name() == ref.grad_fn.name() and torch.equal(y, ref)
        wanted = (x, w) if bias is None else (x, w, b)
        got, want = torch.autograd.grad(y.sum(), wanted), torch.autograd.grad(ref.sum(), wanted)
        assert all(torch.equal(g_, r) for g_, r in zip(got, want))
    with torch.no_grad():
        assert torch.equal(linear_op.layer_linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("env,vendor,mkl,onednn,expected", [
    ("", "GenuineIntel", True, True, "aten"),          # MKL runs its own kernels on Intel
    ("", "AuthenticAMD", True, True, "onednn"),        # MKL's generic path off Intel
    ("", "", True, True, "onednn"),                    # vendor unknown: oneDNN, as before
    ("", "GenuineIntel", False, True, "onednn"),       # no MKL: oneDNN
    ("", "AuthenticAMD", True, False, "aten"),         # no oneDNN: ATen is all there is
    ("onednn", "GenuineIntel", True, True, "onednn"),  # the environment variable decides
    (" ATen ", "AuthenticAMD", True, True, "aten"),
])
def test_choose_cpu_gemm(env, vendor, mkl, onednn, expected):
    library, why = linear_op.choose_cpu_gemm(env=env, vendor=vendor, mkl=mkl, onednn=onednn)
    assert library == expected and why
    if env:
        assert linear_op.CPU_GEMM_ENV_VAR in why


def test_choose_cpu_gemm_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="VITKERNELS_CPU_GEMM must be one of"):
        linear_op.choose_cpu_gemm(env="mkl", vendor="GenuineIntel", mkl=True, onednn=True)
    with pytest.raises(ValueError, match="no oneDNN"):
        linear_op.choose_cpu_gemm(env="onednn", vendor="GenuineIntel", mkl=True, onednn=False)


def test_cpu_gemm_env_var_is_read_at_import(tmp_path):
    """``VITKERNELS_CPU_GEMM`` set before vitkernels is imported decides CPU_GEMM (and so auto's linear backend)."""
    import subprocess
    import sys
    code = ("from vitkernels.ops import linear as L; import torch; from vitkernels import dispatch; "
            "print(L.CPU_GEMM, L.op.select(dispatch.Call(torch.device('cpu'), torch.float32)).backend)")
    out = {}
    for library in ("aten", "onednn"):
        env = dict(__import__("os").environ, VITKERNELS_CPU_GEMM=library)
        out[library] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout.split()
    assert out["aten"] == ["aten", "reference"]
    if linear_op.onednn_available():
        assert out["onednn"] == ["onednn", "native"]


def test_auto_picks_native_for_float32_and_reference_otherwise(monkeypatch):
    onednn_or_skip()
    monkeypatch.setattr(linear_op, "CPU_GEMM", "onednn")
    cpu = torch.device("cpu")
    assert linear_op.op.select(dispatch.Call(cpu, torch.float32)).backend == "native"
    assert linear_op.op.select(dispatch.Call(cpu, torch.bfloat16)).backend == "reference"
    assert linear_op.op.select(dispatch.Call(cpu, torch.float64)).backend == "reference"
    assert linear_op.op.select(dispatch.Call(torch.device("cuda"), torch.float32)).backend == "reference"
    x, w, b = inputs((5, 8), 4, True)
    out = linear(x.detach().double(), w.detach().double(), b.detach().double(), "gelu")
    assert out.dtype == torch.float64
    assert torch.equal(out, expected64(x, w, b, "gelu"))


def test_auto_passes_native_over_where_aten_is_the_cpu_gemm(monkeypatch):
    """auto picks the reference (F.linear) where ATen is the CPU GEMM, and says why; backend="native" still runs
    oneDNN."""
    onednn_or_skip()
    monkeypatch.setattr(linear_op, "CPU_GEMM", "aten")
    call = dispatch.Call(torch.device("cpu"), torch.float32)
    assert linear_op.op.select(call).backend == "reference"
    choice, reasons = linear_op.op.auto_choice(call)
    assert choice == "reference" and "auto passes it over" in reasons["native"]
    assert linear_op.op.reasons(call)["native"] is None  # it can serve the call
    assert linear_op.op.select(call, "native").backend == "native"
    x, w, b = inputs((5, 8), 4, True)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert_close_scaled(linear(x, w, b, backend="native"), expected64(x, w, b, None).detach(), torch.float32)


def test_autocast_goes_through_f_linear(monkeypatch):
    """Under autocast, where the CPU has bf16 GEMM instructions (pinned here), the call is F.linear's, bit for bit
    (autocast casts its operands exactly as for timm)."""
    monkeypatch.setattr(linear_op, "CPU_BF16_GEMM_EMULATED", False)
    x, w, b = inputs((6, 32), 16, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b)
        ref = F.linear(x, w, b)
        assert torch.equal(linear_op.layer_linear(x, w, b), ref)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_autocast_bf16_product_through_float32_gemm_where_bf16_is_emulated(monkeypatch, bias, activation):
    """Where the CPU's bf16 GEMM is emulated (pinned here, so that every CPU runs it; Zen 2 / 3 really are), CPU
    bf16 autocast's product runs through the float32 GEMM on the bf16-rounded operands: the same dtypes as
    autocast's F.linear, the output equal up to summation order (products of bf16 values are exact in float32)
    and as close to the exact product of the rounded operands, the gradients too; linear() and layer_linear() both;
    float16 autocast and torch.compile keep autocast's own GEMM."""
    monkeypatch.setattr(linear_op, "CPU_BF16_GEMM_EMULATED", True)
    torch.manual_seed(0)
    x, w, b = inputs((3, 40, 96), 160, bias)
    g = torch.randn(3, 40, 160)
    results = []
    for fn in (lambda *a: linear(*a, activation), lambda *a: linear_op.reference.linear(*a, activation)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b)
        leaves = [t for t in (x, w, b) if t is not None]
        results.append((y, torch.autograd.grad(y, leaves, g.to(y.dtype))))
    (ours, our_grads), (ref, ref_grads) = results
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert [t.dtype for t in our_grads] == [t.dtype for t in ref_grads] == [torch.float32] * len(ref_grads)
    rel = lambda a, e: ((a.double() - e.double()).norm() / e.double().norm()).item()  # noqa: E731
    assert rel(ours, ref) < 1e-4
    exact = linear_op.reference.linear(*(t.detach().bfloat16().double() if t is not None else None for t in (x, w, b)),
                                       activation)
    assert rel(ours, exact) < 1.25 * rel(ref, exact) + 1e-6
    for mine, theirs in zip(our_grads, ref_grads):
        assert rel(mine, theirs) < 2e-3
    if activation is None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear_op.layer_linear_route(x, w, b) == "autocast"
            assert rel(linear_op.layer_linear(x, w, b), ref) < 1e-4
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        x64, w64 = x.detach().double(), w.detach().double()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 operands: autocast leaves them alone
            assert torch.equal(linear(x64, w64), F.linear(x64, w64)) and linear(x64, w64).dtype == torch.float64
        compiled = torch.compile(lambda t: linear(t, w, b), backend="aot_eager", fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(compiled(x), F.linear(x, w, b))


def test_opcheck():
    onednn_or_skip()
    x, w, b = inputs((3, 5, 24), 12, True)
    for activation in ("none", "gelu", "gelu_tanh"):
        torch.library.opcheck(torch.ops.vitkernels.onednn_linear.default, (x, w, b, activation))
    torch.library.opcheck(torch.ops.vitkernels.onednn_linear.default, (x, w, None, "none"))


def test_op_without_the_extension_is_a_python_custom_op(tmp_path):
    """Without vitkernels._C the op vitkernels::onednn_linear is defined in Python (same body, same fake and
    autograd): checked in a fresh interpreter where importing vitkernels._C fails."""
    import subprocess
    import sys
    onednn_or_skip()
    code = """
import sys
sys.modules["vitkernels._C"] = None  # import fails: the package runs without its extension
import torch
from vitkernels import _native
from vitkernels.ops import linear as linear_op
assert not _native.is_loaded()
assert linear_op._onednn_linear is torch.ops.vitkernels.onednn_linear.default
torch.manual_seed(0)
x = torch.randn(3, 5, 24, requires_grad=True)
w = torch.randn(12, 24, requires_grad=True)
b = torch.randn(12, requires_grad=True)
for activation in ("none", "gelu", "gelu_tanh"):
    torch.library.opcheck(torch.ops.vitkernels.onednn_linear.default, (x, w, b, activation))
    y = torch.ops.vitkernels.onednn_linear(x, w, b, activation)
    ref = torch.nn.functional.linear(x, w, b)
    if activation != "none":
        ref = torch.nn.functional.gelu(ref, approximate="none" if activation == "gelu" else "tanh")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y.sum(), (x, w, b))
    want = torch.autograd.grad(ref.sum(), (x, w, b))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
try:
    torch.ops.vitkernels.onednn_linear(x, w, b, "relu")
except ValueError as exc:
    assert "activation must be one of" in str(exc)
else:
    raise AssertionError("an unknown activation was accepted")
print("python custom op ok")
"""
    import os
    import vitkernels
    root = os.path.dirname(os.path.dirname(os.path.abspath(vitkernels.__file__)))  # the package this run imports
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "python custom op ok" in proc.stdout


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_compiles_fullgraph(activation):
    onednn_or_skip()
    x, w, b = inputs((2, 7, 40), 24, True)
    fn = torch.compile(lambda x, w, b: linear(x, w, b, activation, backend="native") * 2, backend="aot_eager",
                       fullgraph=True)
    out = fn(x, w, b)
    out.sum().backward()
    assert_close_scaled(out, 2 * expected64(x, w, b, activation).detach(), torch.float32)
    want = torch.autograd.grad((2 * expected64(x, w, b, activation)).sum(), (x, w, b))
    for got, exp in zip((x.grad, w.grad, b.grad), want):
        assert_close_scaled(got, exp.float(), torch.float32)


def test_linear_module_is_a_drop_in():
    torch.manual_seed(0)
    ref = nn.Linear(33, 17)
    ours = Linear(33, 17)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 9, 33)
    assert_close_scaled(ours(x), ref(x).detach(), torch.float32)
    assert Linear(3, 2, bias=False, backend="reference").bias is None


def test_class_swap_keeps_parameters_state_dict_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 8, bias=False),
                          nn.MultiheadAttention(8, 2, batch_first=True))
    before = copy.deepcopy(model.state_dict())
    params = [id(p) for p in model.parameters()]
    x = torch.randn(3, 5, 20)
    expected = model[:3](x)
    patch_linears(model)
    assert type(model[0]) is Linear and type(model[2]) is Linear
    assert type(model[3].out_proj) is not Linear  # nn.Linear subclass: left alone
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    got = model[:3](x)
    assert_close_scaled(got, expected.detach(), torch.float32)
    got.sum().backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is not None


def test_patch_model_swaps_vit_linears():
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    keys = list(model.state_dict())
    patch_model(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.blocks[0].attn.qkv, Linear) and isinstance(model.head, Linear)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert_close_scaled(model(x), expected, torch.float32)
    untouched = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=1)
    patch_model(untouched, linear=False)
    assert type(untouched.head) is nn.Linear


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(3, 4), torch.randn(5, 3)), ValueError, "weight must have shape"),
    ((torch.randn(3, 4), torch.randn(4)), ValueError, "weight must have 2 dimensions"),
    ((torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)), ValueError, "bias must have shape"),
    ((torch.randn(3, 4).int(), torch.randn(5, 4)), TypeError, "x must have dtype"),
    ((torch.randn(3, 4), torch.randn(5, 4).double()), TypeError, "weight has dtype"),
    ((torch.randn(3, 4), torch.randn(5, 4), None, "relu"), ValueError, "activation must be one of"),
    ((torch.tensor(1.0), torch.randn(5, 1)), ValueError, "at least one dimension"),
])
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        linear(*args)
