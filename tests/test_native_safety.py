"""Safety of the native backend (and of the other backends where they share the case), issue 13:

* windows and shifts larger than the feature map, on every backend, against timm's roll + pad + partition;
* the C++ entry points validate every argument they index, called directly (``torch.ops.vitkernels.*``) and from
  ``torch.compile``'d code, which skip the Python checks (a bad-input corpus: each case raises naming the argument);
* second-order gradients: implemented (patch_embed) or refused with a clear error (window attention, the fused row
  ops, losses); every op has an autograd kernel; the in-place inference variants refuse tensors that require grad;
* edge cases: empty batch / channels, unusual strides, clear errors for the unclear ones, NaN / Inf.

The same cases run under AddressSanitizer + UBSan in ``.ci/sanitize``.
"""
import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels import _native
from vitkernels.reference import window_attention as reference_attention

from helpers import assert_close, import_timm, reference_dtype, triton_interpreter_or_cuda

needs_native = pytest.mark.skipif(not _native.is_loaded(), reason=_native.IMPORT_ERROR or "")
ops = torch.ops.vitkernels


def backend_or_skip(backend):
    if backend == "triton":
        triton_interpreter_or_cuda("cpu")
    if backend == "native" and not _native.is_loaded():
        pytest.skip(_native.IMPORT_ERROR)


# --- windows and shifts larger than the feature map -------------------------------------------------------------

def timm_partition(x, window, shift):
    """timm SwinTransformerBlock._attn: roll the unpadded map by -shift, pad bottom / right, partition."""
    from timm.models.swin_transformer import window_partition

    B, H, W, C = x.shape
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = F.pad(x, (0, 0, 0, (-W) % window[1], 0, (-H) % window[0]))
    return window_partition(x, window).reshape(-1, window[0] * window[1], C)


def timm_reverse(windows, H, W, window, shift):
    """The inverse in timm: merge the padded map, crop, roll by +shift."""
    from timm.models.swin_transformer import window_reverse

    Hp, Wp = H + (-H) % window[0], W + (-W) % window[1]
    x = window_reverse(windows.reshape(-1, window[0], window[1], windows.shape[-1]), window, Hp, Wp)
    return torch.roll(x[:, :H, :W], shifts=shift, dims=(1, 2))


# (H, W) x window x shift, windows larger than the map on one or both axes, shifts >= H or >= W included
MAPS = [(1, 1), (2, 3), (3, 2), (5, 4)]
WINDOWS = [(3, 2), (4, 4), (7, 5)]
GRID = [
    (H, W, window, shift)
    for H, W in MAPS
    for window in WINDOWS
    for shift in sorted({(0, 0), (1, 1), (window[0] - 1, window[1] - 1), (window[0] // 2, 0)})
]
GRID_IDS = [f"{H}x{W}w{wh}x{ww}s{sh}x{sw}" for H, W, (wh, ww), (sh, sw) in GRID]


@pytest.mark.timm
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("case", GRID, ids=GRID_IDS)
def test_partition_and_reverse_match_timm_for_windows_larger_than_the_map(case, backend):
    import_timm()
    backend_or_skip(backend)
    H, W, window, shift = case
    x = torch.randn(2, H, W, 3, dtype=torch.float64, requires_grad=True)
    x_timm = x.detach().clone().requires_grad_()
    windows = vitkernels.window_partition(x, window, shift, backend=backend)
    expected = timm_partition(x_timm, window, shift)
    torch.testing.assert_close(windows, expected, rtol=0, atol=0)
    grad = torch.randn_like(expected)
    windows.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_timm.grad, rtol=0, atol=0)  # the backward is window_reverse

    # window_reverse, and its backward (window_partition), on its own
    w = grad.clone().requires_grad_()
    back = vitkernels.window_reverse(w, H, W, window, shift, backend=backend)
    torch.testing.assert_close(back, timm_reverse(grad, H, W, window, shift), rtol=0, atol=0)
    g2 = torch.randn_like(back)
    back.backward(g2)
    torch.testing.assert_close(w.grad, timm_partition(g2, window, shift), rtol=0, atol=0)


@pytest.mark.timm
@needs_native
@pytest.mark.parametrize("case", GRID, ids=GRID_IDS)
def test_native_window_attention_for_windows_larger_than_the_map(case):
    """Forward and every gradient, float64, against the reference (itself timm's roll + pad + partition)."""
    H, W, window, shift = case
    nH, hd = 2, 3
    qkv = torch.randn(2, H, W, 3 * nH * hd, dtype=torch.float64, requires_grad=True)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), nH, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3 * nH * hd, dtype=torch.float64, requires_grad=True)
    inputs = (qkv, table, bias)
    out = vitkernels.window_attention(qkv, table, window, shift, nH, 0.4, bias, backend="native")
    expected = reference_attention.window_attention(qkv, table, window, shift, nH, 0.4, bias)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    for g, e, v in zip(got, want, inputs):
        torch.testing.assert_close(g, torch.zeros_like(v) if e is None else e, rtol=1e-9, atol=1e-9)


TRITON_GRID = [(2, 3, (3, 2), (2, 1)), (1, 1, (4, 4), (3, 3)), (3, 2, (7, 5), (6, 4)), (5, 4, (7, 5), (3, 0))]


@pytest.mark.parametrize("case", TRITON_GRID, ids=[f"{c[0]}x{c[1]}w{c[2]}s{c[3]}" for c in TRITON_GRID])
def test_triton_window_attention_for_windows_larger_than_the_map(case):
    backend_or_skip("triton")
    H, W, window, shift = case
    nH, hd = 1, 16  # the Triton kernels take power-of-two head dims >= 16
    qkv = torch.randn(1, H, W, 3 * nH * hd, requires_grad=True)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), nH, requires_grad=True)
    bias = torch.randn(3 * nH * hd, requires_grad=True)
    out = vitkernels.window_attention(qkv, table, window, shift, nH, None, bias, backend="triton")
    ref_in = [t.detach().double().requires_grad_() for t in (qkv, table, bias)]
    expected = reference_attention.window_attention(ref_in[0], ref_in[1], window, shift, nH, hd ** -0.5, ref_in[2])
    assert_close(out, expected, torch.float32)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, table, bias), grad)
    want = torch.autograd.grad(expected, ref_in, grad.double(), allow_unused=True)
    for g, e, v in zip(got, want, ref_in):
        assert_close(g, torch.zeros_like(v) if e is None else e, torch.float32, atol=1e-4)


@pytest.mark.timm
@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("res,window,shift", [((2, 2), 7, 3), ((3, 5), 4, 2), ((1, 6), (3, 3), (2, 1)), ((5, 4), 6, 5)])
def test_swin_block_always_partition_matches_timm(res, window, shift, backend):
    """A window larger than the map with timm's always_partition=True (no clamping): same numbers as timm's block."""
    import_timm()
    backend_or_skip(backend)
    from timm.models.swin_transformer import SwinTransformerBlock as TimmBlock

    kwargs = dict(dim=16, input_resolution=res, num_heads=2, window_size=window, shift_size=shift,
                  always_partition=True)
    ref = TimmBlock(**kwargs).double()
    block = vitkernels.SwinBlock(**kwargs, backend=backend).double()
    block.load_state_dict(ref.state_dict())
    assert block.window_size == ref.window_size and block.shift_size == ref.shift_size
    assert any(w > r for w, r in zip(ref.window_size, res))  # a window larger than the map on some axis
    x = torch.randn(2, *res, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = block(x), ref(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-9, msg=name)
    with torch.no_grad():  # the inference path too
        torch.testing.assert_close(block.eval()(x), ref.eval()(x), rtol=1e-9, atol=1e-10)


# --- the C++ entry points check what they index (direct calls) ----------------------------------------------------

def _perm_rows(N, L):
    return torch.stack([torch.randperm(L) for _ in range(N)])


def _bad_native_calls():
    """(id, thunk, message): direct calls of the registered ops the Python wrappers would refuse."""
    x4 = torch.randn(1, 3, 3, 4)
    qkv = torch.randn(1, 4, 4, 12)
    table = torch.randn(9, 2)
    qkv3 = torch.randn(1, 4, 4, 4, 12)
    table27 = torch.randn(27, 2)
    src = torch.randn(2, 6, 4)
    idx = torch.tensor([[0, 2], [5, 1]])
    inverse = torch.tensor([[0, -1, 1, -1, -1, -1], [-1, 1, -1, -1, -1, 0]])
    x_dec = torch.randn(2, 3, 4)  # CLS + 2 visible tokens
    ids = _perm_rows(2, 5)
    token = torch.randn(4)
    grad_dec = torch.randn(2, 6, 4)
    img = torch.randn(2, 3, 8, 8)
    weight = torch.randn(5, 3, 4, 4)
    bad_ids = [
        ("negative", torch.tensor([[0, 1, 2, 3, -1], [0, 1, 2, 3, 4]])),
        ("too-large", torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 5]])),
        ("repeated", torch.tensor([[0, 1, 2, 3, 4], [0, 1, 1, 3, 4]])),
    ]
    cases = [
        # window_partition / window_reverse
        ("partition-window-overflow", lambda: ops.window_partition(x4, [2 ** 62, 4], [0, 0]), "overflows int64"),
        ("partition-window-overflow-2", lambda: ops.window_partition(x4, [2 ** 31, 2 ** 31], [0, 0]),
         "overflows int64"),
        ("partition-window-zero", lambda: ops.window_partition(x4, [0, 2], [0, 0]), "window_size must be positive"),
        ("partition-window-triple", lambda: ops.window_partition(x4, [2, 2, 2], [0, 0]), "window_size must be a pair"),
        ("partition-shift-ge-window", lambda: ops.window_partition(x4, [2, 2], [2, 0]), "0 <= shift < window_size"),
        ("partition-shift-negative", lambda: ops.window_partition(x4, [2, 2], [0, -1]), "0 <= shift < window_size"),
        ("partition-empty-image", lambda: ops.window_partition(torch.randn(1, 0, 3, 2), [2, 2], [0, 0]),
         "image must be non-empty"),
        ("partition-rank", lambda: ops.window_partition(torch.randn(3, 3, 4), [2, 2], [0, 0]), "x must be"),
        ("reverse-windows-count", lambda: ops.window_reverse(torch.randn(3, 4, 2), 3, 3, [2, 2], [1, 1]),
         "not a multiple"),
        ("reverse-tokens", lambda: ops.window_reverse(torch.randn(4, 5, 2), 3, 3, [2, 2], [1, 1]), "wh \\* ww"),
        ("reverse-height", lambda: ops.window_reverse(torch.randn(4, 4, 2), 0, 3, [2, 2], [1, 1]), "non-empty"),
        ("reverse-overflow", lambda: ops.window_reverse(torch.randn(4, 4, 2), 3, 3, [2 ** 62, 2], [0, 0]),
         "overflows int64"),
        # window_attention
        ("attn-heads-zero", lambda: ops.window_attention(qkv, table, None, [2, 2], [1, 1], 0, 0.5), "num_heads"),
        ("attn-heads-negative", lambda: ops.window_attention(qkv, table, None, [2, 2], [1, 1], -2, 0.5), "num_heads"),
        ("attn-head-dim-zero", lambda: ops.window_attention(torch.randn(1, 4, 4, 0), table, None, [2, 2], [1, 1], 2,
                                                            0.5), "head_dim > 0"),
        ("attn-channels", lambda: ops.window_attention(torch.randn(1, 4, 4, 13), table, None, [2, 2], [1, 1], 2, 0.5),
         "is not 3 \\* num_heads \\* head_dim"),
        ("attn-table-rows", lambda: ops.window_attention(qkv, table[:8], None, [2, 2], [1, 1], 2, 0.5),
         "relative_position_bias_table must be"),
        ("attn-table-heads", lambda: ops.window_attention(qkv, table[:, :1], None, [2, 2], [1, 1], 2, 0.5),
         "relative_position_bias_table must be"),
        ("attn-table-dtype", lambda: ops.window_attention(qkv, table.long(), None, [2, 2], [1, 1], 2, 0.5),
         "relative_position_bias_table must be a floating"),
        ("attn-bias-size", lambda: ops.window_attention(qkv, table, torch.randn(11), [2, 2], [1, 1], 2, 0.5),
         "qkv_bias must be"),
        ("attn-qkv-dtype", lambda: ops.window_attention(qkv.long(), table, None, [2, 2], [1, 1], 2, 0.5),
         "qkv must be a floating"),
        ("attn-window-overflow", lambda: ops.window_attention(qkv, table, None, [2 ** 20, 2 ** 20], [1, 1], 2, 0.5),
         "overflows int64"),
        ("attn-bwd-lse", lambda: ops.window_attention_backward(torch.randn(1, 4, 4, 4), qkv, table, None,
                                                               torch.randn(1, 4, 4, 4), torch.randn(3), [2, 2],
                                                               [1, 1], 2, 0.5), "lse must be"),
        ("attn-bwd-grad-shape", lambda: ops.window_attention_backward(torch.randn(1, 4, 4, 3), qkv, table, None,
                                                                      torch.randn(1, 4, 4, 4), torch.randn(4, 2, 4),
                                                                      [2, 2], [1, 1], 2, 0.5), "grad_out and out"),
        # a 4-D softmax state is the saved softmax (4 windows, 2 heads, 4 tokens, 16): anything else is refused
        ("attn-bwd-probs-unpadded", lambda: ops.window_attention_backward(
            torch.randn(1, 4, 4, 4), qkv, table, None, torch.randn(1, 4, 4, 4), torch.randn(4, 2, 4, 4), [2, 2],
            [1, 1], 2, 0.5), "lse must be"),
        ("attn-bwd-probs-heads", lambda: ops.window_attention_backward(
            torch.randn(1, 4, 4, 4), qkv, table, None, torch.randn(1, 4, 4, 4), torch.randn(4, 1, 4, 16), [2, 2],
            [1, 1], 2, 0.5), "lse must be"),
        ("attn-bwd-probs-dtype", lambda: ops.window_attention_backward(
            torch.randn(1, 4, 4, 4), qkv, table, None, torch.randn(1, 4, 4, 4),
            torch.randn(4, 2, 4, 16, dtype=torch.float64), [2, 2], [1, 1], 2, 0.5), "lse must be"),
        # window_attention_v2's backward: the same softmax states (lse or saved softmax) as V1's
        ("attn-v2-bwd-lse", lambda: ops.window_attention_v2_backward(
            torch.randn(1, 4, 4, 4), qkv, table, torch.ones(2), None, torch.randn(1, 4, 4, 4), torch.randn(3), [2, 2],
            [1, 1], 2), "lse must be"),
        ("attn-v2-bwd-probs-unpadded", lambda: ops.window_attention_v2_backward(
            torch.randn(1, 4, 4, 4), qkv, table, torch.ones(2), None, torch.randn(1, 4, 4, 4),
            torch.randn(4, 2, 4, 4), [2, 2], [1, 1], 2), "lse must be"),
        ("attn-v2-bwd-probs-windows", lambda: ops.window_attention_v2_backward(
            torch.randn(1, 4, 4, 4), qkv, table, torch.ones(2), None, torch.randn(1, 4, 4, 4),
            torch.randn(8, 2, 4, 16), [2, 2], [1, 1], 2), "lse must be"),
        # cpu_gemm (a @ b + bias, float32 CPU, vitkernels' own GEMM)
        ("gemm-b-rank", lambda: ops.cpu_gemm(torch.randn(3, 4), torch.randn(4, 5, 1)), "must be 2D"),
        ("gemm-scalar-a", lambda: ops.cpu_gemm(torch.tensor(1.0), torch.randn(1, 5)), "at least one dimension"),
        ("gemm-k", lambda: ops.cpu_gemm(torch.randn(3, 4), torch.randn(5, 5)), "must agree on K"),
        ("gemm-dtype", lambda: ops.cpu_gemm(torch.randn(3, 4).double(), torch.randn(4, 5).double()), "float32"),
        ("gemm-mixed-dtype", lambda: ops.cpu_gemm(torch.randn(3, 4), torch.randn(4, 5).half()), "float32"),
        ("gemm-bias-size", lambda: ops.cpu_gemm(torch.randn(3, 4), torch.randn(4, 5), torch.randn(4)),
         "bias must be"),
        ("gemm-bias-rank", lambda: ops.cpu_gemm(torch.randn(3, 4), torch.randn(4, 5), torch.randn(1, 5)),
         "bias must be"),
        ("gemm-bias-dtype", lambda: ops.cpu_gemm(torch.randn(3, 4), torch.randn(4, 5), torch.randn(5).double()),
         "bias must be a float32"),
        # gelu_mlp_eager (gelu(x W1^T + b1) W2^T + b2 on the own GEMM, float32 CPU): x (3, 4), w1 (8, 4), w2 (5, 8)
        ("mlp-eager-w1-rank", lambda: ops.gelu_mlp_eager(torch.randn(3, 4), torch.randn(8), None, torch.randn(5, 8),
                                                         None, "none"), "w1 must be"),
        ("mlp-eager-w1-shape", lambda: ops.gelu_mlp_eager(torch.randn(3, 4), torch.randn(8, 5), None,
                                                          torch.randn(5, 8), None, "none"), "w1 must be"),
        ("mlp-eager-w2-shape", lambda: ops.gelu_mlp_eager(torch.randn(3, 4), torch.randn(8, 4), None,
                                                          torch.randn(5, 7), None, "none"), "w2 must be"),
        ("mlp-eager-w2-rank", lambda: ops.gelu_mlp_eager(torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(8),
                                                         None, "none"), "w2 must be"),
        ("mlp-eager-b1-size", lambda: ops.gelu_mlp_eager(torch.randn(3, 4), torch.randn(8, 4), torch.randn(7),
                                                         torch.randn(5, 8), None, "tanh"), "b1 must be"),
        ("mlp-eager-b2-size", lambda: ops.gelu_mlp_eager(torch.randn(3, 4), torch.randn(8, 4), None,
                                                         torch.randn(5, 8), torch.randn(6), "none"), "b2 must be"),
        ("mlp-eager-dtype", lambda: ops.gelu_mlp_eager(torch.randn(3, 4).double(), torch.randn(8, 4).double(), None,
                                                       torch.randn(5, 8).double(), None, "none"), "must be float32"),
        ("mlp-eager-scalar-x", lambda: ops.gelu_mlp_eager(torch.tensor(1.0), torch.randn(8, 1), None,
                                                          torch.randn(5, 8), None, "none"), "x must be"),
        ("mlp-eager-approximate", lambda: ops.gelu_mlp_eager(torch.randn(3, 4), torch.randn(8, 4), None,
                                                             torch.randn(5, 8), None, "erf"), "approximate must be"),
        # gelu_mlp_own (the same forward for torch.compile, -> (y, h, pre)) and its GELU-backward GEMM
        # gelu_mlp_own_grad_pre(grad (M, N), w2 (N, H), pre (M, H)): grad (6, 5), w2 (5, 8), pre (6, 8)
        ("mlp-own-w2-shape", lambda: ops.gelu_mlp_own(torch.randn(3, 4), torch.randn(8, 4), None, torch.randn(5, 7),
                                                      None, "none", True), "w2 must be"),
        ("mlp-own-b1-size", lambda: ops.gelu_mlp_own(torch.randn(3, 4), torch.randn(8, 4), torch.randn(7),
                                                     torch.randn(5, 8), None, "tanh", False), "b1 must be"),
        ("mlp-own-dtype", lambda: ops.gelu_mlp_own(torch.randn(3, 4).double(), torch.randn(8, 4).double(), None,
                                                   torch.randn(5, 8).double(), None, "none", True), "must be float32"),
        ("mlp-grad-pre-rows", lambda: ops.gelu_mlp_own_grad_pre(torch.randn(7, 5), torch.randn(5, 8),
                                                                torch.randn(6, 8), "none"), "grad must be"),
        ("mlp-grad-pre-width", lambda: ops.gelu_mlp_own_grad_pre(torch.randn(6, 4), torch.randn(5, 8),
                                                                 torch.randn(6, 8), "none"), "grad must be"),
        ("mlp-grad-pre-w2", lambda: ops.gelu_mlp_own_grad_pre(torch.randn(6, 5), torch.randn(5, 9),
                                                              torch.randn(6, 8), "none"), "w2 must be"),
        ("mlp-grad-pre-pre-rank", lambda: ops.gelu_mlp_own_grad_pre(torch.randn(6, 5), torch.randn(5, 8),
                                                                    torch.randn(48), "none"), "pre must be"),
        ("mlp-grad-pre-strided", lambda: ops.gelu_mlp_own_grad_pre(torch.randn(6, 5), torch.randn(5, 8),
                                                                   torch.randn(6, 16)[:, ::2], "none"), "pre must be"),
        ("mlp-grad-pre-dtype", lambda: ops.gelu_mlp_own_grad_pre(torch.randn(6, 5).double(), torch.randn(5, 8),
                                                                 torch.randn(6, 8), "none"), "grad must be"),
        ("mlp-grad-pre-approximate", lambda: ops.gelu_mlp_own_grad_pre(torch.randn(6, 5), torch.randn(5, 8),
                                                                       torch.randn(6, 8), "erf"),
         "approximate must be"),
        # onednn_linear_eager (x W^T + b, float32 CPU)
        ("linear-eager-weight-shape", lambda: ops.onednn_linear_eager(torch.randn(3, 4), torch.randn(5, 3), None),
         "weight must be"),
        ("linear-eager-weight-rank", lambda: ops.onednn_linear_eager(torch.randn(3, 4), torch.randn(4), None),
         "weight must be"),
        ("linear-eager-scalar-x", lambda: ops.onednn_linear_eager(torch.tensor(1.0), torch.randn(5, 1), None),
         "at least one dimension"),
        ("linear-eager-dtype", lambda: ops.onednn_linear_eager(torch.randn(3, 4).double(), torch.randn(5, 4).double(),
                                                               None), "float32"),
        ("linear-eager-bias-size", lambda: ops.onednn_linear_eager(torch.randn(3, 4), torch.randn(5, 4),
                                                                   torch.randn(4)), "bias must be"),
        ("linear-eager-bias-dtype", lambda: ops.onednn_linear_eager(torch.randn(3, 4), torch.randn(5, 4),
                                                                    torch.randn(5).double()), "bias must be"),
        # onednn_linear (act(x W^T + b), the op torch.compile keeps): the same checks, and the activation's name
        ("linear-weight-shape", lambda: ops.onednn_linear(torch.randn(3, 4), torch.randn(5, 3), None, "none"),
         "onednn_linear: weight must be"),
        ("linear-scalar-x", lambda: ops.onednn_linear(torch.tensor(1.0), torch.randn(5, 1), None, "none"),
         "at least one dimension"),
        ("linear-dtype", lambda: ops.onednn_linear(torch.randn(3, 4).double(), torch.randn(5, 4).double(), None,
                                                   "gelu"), "float32"),
        ("linear-bias-size", lambda: ops.onednn_linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4),
                                                       "none"), "bias must be"),
        ("linear-activation", lambda: ops.onednn_linear(torch.randn(3, 4), torch.randn(5, 4), None, "relu"),
         "activation must be"),
        # window_attention_add_bias's backward: the softmax state is the lse (4 windows, 2 heads, 4 tokens) or the
        # saved softmax (4, 2, 4, 16): anything else is refused, never read past its end
        ("attn-add-bias-bwd-lse", lambda: ops.window_attention_add_bias_backward(
            torch.randn(1, 4, 4, 4), qkv, table, torch.randn(12), torch.randn(1, 4, 4, 4), torch.randn(3), [2, 2],
            [1, 1], 2, 0.5), "lse must be"),
        ("attn-add-bias-bwd-probs-unpadded", lambda: ops.window_attention_add_bias_backward(
            torch.randn(1, 4, 4, 4), qkv, table, torch.randn(12), torch.randn(1, 4, 4, 4), torch.randn(4, 2, 4, 4),
            [2, 2], [1, 1], 2, 0.5), "softmax_state must be"),
        ("attn-add-bias-bwd-probs-windows", lambda: ops.window_attention_add_bias_backward(
            torch.randn(1, 4, 4, 4), qkv, table, torch.randn(12), torch.randn(1, 4, 4, 4), torch.randn(2, 2, 4, 16),
            [2, 2], [1, 1], 2, 0.5), "softmax_state must be"),
        ("attn-add-bias-bwd-probs-dtype", lambda: ops.window_attention_add_bias_backward(
            torch.randn(1, 4, 4, 4), qkv, table, torch.randn(12), torch.randn(1, 4, 4, 4),
            torch.randn(4, 2, 4, 16, dtype=torch.float64), [2, 2], [1, 1], 2, 0.5), "softmax_state must be"),
        # window_attention_3d: qkv (1, 4, 4, 4, 3 * 2 * 2), window (2, 2, 2): a (27, 2) table
        ("attn3d-rank", lambda: ops.window_attention_3d(qkv, table27, None, [2, 2, 2], [1, 1, 1], 2, 0.5, True),
         "qkv must be \\(B, D, H, W"),
        ("attn3d-window-pair", lambda: ops.window_attention_3d(qkv3, table27, None, [2, 2], [1, 1], 2, 0.5, True),
         "window_size must have 3 entries"),
        ("attn3d-shift-pair", lambda: ops.window_attention_3d(qkv3, table27, None, [2, 2, 2], [1, 1], 2, 0.5, True),
         "shift_size must have 3 entries"),
        ("attn3d-window-zero", lambda: ops.window_attention_3d(qkv3, table27, None, [2, 0, 2], [0, 0, 0], 2, 0.5,
                                                               True), "window_size must be positive"),
        ("attn3d-shift-ge-window", lambda: ops.window_attention_3d(qkv3, table27, None, [2, 2, 2], [0, 2, 0], 2, 0.5,
                                                                   False), "0 <= shift < window_size"),
        ("attn3d-shift-negative", lambda: ops.window_attention_3d(qkv3, table27, None, [2, 2, 2], [-1, 0, 0], 2, 0.5,
                                                                  True), "0 <= shift < window_size"),
        ("attn3d-empty-volume", lambda: ops.window_attention_3d(torch.randn(1, 4, 0, 4, 12), table27, None,
                                                                [2, 2, 2], [1, 1, 1], 2, 0.5, True),
         "volume must be non-empty"),
        ("attn3d-heads-zero", lambda: ops.window_attention_3d(qkv3, table27, None, [2, 2, 2], [1, 1, 1], 0, 0.5, True),
         "num_heads"),
        ("attn3d-channels", lambda: ops.window_attention_3d(torch.randn(1, 4, 4, 4, 13), table27, None, [2, 2, 2],
                                                            [1, 1, 1], 2, 0.5, True),
         "is not 3 \\* num_heads \\* head_dim"),
        ("attn3d-table-rows", lambda: ops.window_attention_3d(qkv3, table27[:26], None, [2, 2, 2], [1, 1, 1], 2, 0.5,
                                                              True), "relative_position_bias_table must be"),
        ("attn3d-table-depth-one", lambda: ops.window_attention_3d(qkv3, table27, None, [1, 2, 2], [0, 1, 1], 2,
                                                                   0.5, True), "relative_position_bias_table must be"),
        ("attn3d-table-heads", lambda: ops.window_attention_3d(qkv3, table27[:, :1], None, [2, 2, 2], [1, 1, 1], 2,
                                                               0.5, True), "relative_position_bias_table must be"),
        ("attn3d-table-dtype", lambda: ops.window_attention_3d(qkv3, table27.long(), None, [2, 2, 2], [1, 1, 1], 2,
                                                               0.5, True),
         "relative_position_bias_table must be a floating"),
        ("attn3d-bias-size", lambda: ops.window_attention_3d(qkv3, table27, torch.randn(11), [2, 2, 2], [1, 1, 1], 2,
                                                             0.5, True), "qkv_bias must be"),
        ("attn3d-bias-dtype", lambda: ops.window_attention_3d(qkv3, table27, torch.ones(12, dtype=torch.long),
                                                              [2, 2, 2], [1, 1, 1], 2, 0.5, True),
         "qkv_bias must be a floating"),
        ("attn3d-qkv-dtype", lambda: ops.window_attention_3d(qkv3.long(), table27, None, [2, 2, 2], [1, 1, 1], 2, 0.5,
                                                             True), "qkv must be a floating"),
        ("attn3d-window-overflow", lambda: ops.window_attention_3d(qkv3, table27, None, [2 ** 21, 2 ** 21, 2 ** 21],
                                                                   [0, 0, 0], 2, 0.5, True), "overflows int64"),
        ("attn3d-window-overflow-nn", lambda: ops.window_attention_3d(qkv3, table27, None, [2 ** 16, 2 ** 16, 1],
                                                                      [0, 0, 0], 2, 0.5, True), "overflows int64"),
        ("attn3d-padded-overflow", lambda: ops.window_attention_3d(qkv3, table27, None, [2 ** 62, 3, 1],
                                                                   [0, 0, 0], 2, 0.5, True), "overflows int64"),
        ("attn3d-bwd-lse", lambda: ops.window_attention_3d_backward(torch.randn(1, 4, 4, 4, 4), qkv3, table27, None,
                                                                    torch.randn(1, 4, 4, 4, 4), torch.randn(3),
                                                                    [2, 2, 2], [1, 1, 1], 2, 0.5, True),
         "lse must be"),
        ("attn3d-bwd-lse-dtype", lambda: ops.window_attention_3d_backward(
            torch.randn(1, 4, 4, 4, 4), qkv3, table27, None, torch.randn(1, 4, 4, 4, 4),
            torch.randn(8, 2, 8, dtype=torch.float64), [2, 2, 2], [1, 1, 1], 2, 0.5, True), "lse must be"),
        ("attn3d-bwd-grad-shape", lambda: ops.window_attention_3d_backward(
            torch.randn(1, 4, 4, 4, 3), qkv3, table27, None, torch.randn(1, 4, 4, 4, 4), torch.randn(8, 2, 8),
            [2, 2, 2], [1, 1, 1], 2, 0.5, True), "grad_out and out"),
        # gather_rows
        ("gather-idx-batch", lambda: ops.gather_rows(src, idx[:1], inverse[:1], None, None), "idx must be"),
        ("gather-inverse-shape", lambda: ops.gather_rows(src, idx, inverse[:, :5], None, None),
         "inverse_idx must be"),
        ("gather-inverse-shared", lambda: ops.gather_rows(src, idx[0], inverse, None, None), "inverse_idx must be"),
        ("gather-idx-dtype", lambda: ops.gather_rows(src, idx.float(), inverse, None, None), "idx must be an int64"),
        ("gather-add-rows", lambda: ops.gather_rows(src, idx, inverse, torch.randn(1, 5, 4), None), "add must be"),
        ("gather-add-dim", lambda: ops.gather_rows(src, idx, inverse, torch.randn(1, 6, 3), None), "add must be"),
        ("gather-add-batch", lambda: ops.gather_rows(src, idx, inverse, torch.randn(3, 6, 4), None), "add must be"),
        ("gather-duplicate-idx", lambda: ops.gather_rows(src, torch.tensor([[0, 0], [5, 1]]), inverse, None, None),
         "inverse_idx must be the inverse of idx"),
        ("gather-wrong-inverse", lambda: ops.gather_rows(src, idx, inverse.roll(1, dims=1), None, None),
         "inverse_idx must be the inverse of idx"),
        ("gather-out-dtype", lambda: ops.gather_rows(src, idx, inverse, None, torch.int32), "out_dtype"),
        ("gather-src-dtype", lambda: ops.gather_rows(src.long(), idx, inverse, None, None), "src must be a floating"),
        # random_masking
        ("masking-pos-rows", lambda: ops.random_masking(src, torch.rand(2, 6), 3, torch.randn(1, 5, 4)),
         "pos_embed must be"),
        ("masking-pos-dim", lambda: ops.random_masking(src, torch.rand(2, 6), 3, torch.randn(1, 6, 2)),
         "pos_embed must be"),
        ("masking-keep-large", lambda: ops.random_masking(src, torch.rand(2, 6), 7, None), "len_keep"),
        ("masking-keep-negative", lambda: ops.random_masking(src, torch.rand(2, 6), -1, None), "len_keep"),
        ("masking-noise-shape", lambda: ops.random_masking(src, torch.rand(2, 5), 3, None), "noise"),
        ("masking-noise-dtype", lambda: ops.random_masking(src, torch.ones(2, 6, dtype=torch.long), 3, None),
         "noise must be a floating"),
        # mae_unshuffle and its backward
        ("unshuffle-token-size", lambda: ops.mae_unshuffle(x_dec, ids, torch.randn(3), None), "mask_token"),
        ("unshuffle-pos-rows", lambda: ops.mae_unshuffle(x_dec, ids, token, torch.randn(1, 5, 4)), "pos_embed must be"),
        ("unshuffle-keep-gt-L", lambda: ops.mae_unshuffle(torch.randn(2, 7, 4), ids, token, None),
         "visible tokens"),
        ("unshuffle-ids-dtype", lambda: ops.mae_unshuffle(x_dec, ids.float(), token, None), "ids_restore must be an"),
        ("unshuffle-bwd-keep", lambda: ops.mae_unshuffle_backward(grad_dec, ids, 6, torch.float32, torch.float32),
         "keep must be"),
        ("unshuffle-bwd-keep-negative", lambda: ops.mae_unshuffle_backward(grad_dec, ids, -1, torch.float32,
                                                                           torch.float32), "keep must be"),
        ("unshuffle-bwd-grad-rows", lambda: ops.mae_unshuffle_backward(grad_dec[:, :5], ids, 2, torch.float32,
                                                                       torch.float32), "grad must be"),
        ("unshuffle-bwd-batch", lambda: ops.mae_unshuffle_backward(grad_dec[:1], ids, 2, torch.float32,
                                                                   torch.float32), "grad must be"),
        ("unshuffle-bwd-dtype", lambda: ops.mae_unshuffle_backward(grad_dec, ids, 2, torch.int64, torch.float32),
         "x_dtype"),
        # patch_embed and its backward
        ("embed-pos-rows", lambda: ops.patch_embed(img, weight, None, torch.randn(3, 5), None, False, False),
         "pos_embed must be"),
        ("embed-pos-rows-prefix", lambda: ops.patch_embed(img, weight, None, torch.randn(4, 5), torch.randn(1, 5),
                                                          False, False), "pos_embed must be"),
        ("embed-bias", lambda: ops.patch_embed(img, weight, torch.randn(4), None, None, False, False),
         "bias must be"),
        ("embed-prefix-dim", lambda: ops.patch_embed(img, weight, None, None, torch.randn(1, 4), False, False),
         "prefix_tokens must be"),
        ("embed-weight-dtype", lambda: ops.patch_embed(img, weight.double(), None, None, None, False, False),
         "weight must have x's dtype"),
        ("embed-channels", lambda: ops.patch_embed(img[:, :2], weight, None, None, None, False, False),
         "input channels"),
        ("embed-not-multiple", lambda: ops.patch_embed(img[..., :7], weight, None, None, None, False, False),
         "not a multiple"),
        ("embed-bwd-prefix-negative", lambda: ops.patch_embed_backward(torch.randn(2, 4, 5), img, weight, -1, False,
                                                                       True, True), "num_prefix"),
        ("embed-bwd-prefix-huge", lambda: ops.patch_embed_backward(torch.randn(2, 4, 5), img, weight, 2 ** 62, False,
                                                                   True, True), "num_prefix"),
        ("embed-bwd-grad", lambda: ops.patch_embed_backward(torch.randn(2, 5, 5), img, weight, 0, False, True, True),
         "grad must be"),
    ]
    for name, bad in bad_ids:
        cases += [
            (f"unshuffle-ids-{name}", lambda bad=bad: ops.mae_unshuffle(x_dec, bad, token, None),
             "ids_restore must be a permutation"),
            (f"unshuffle-bwd-ids-{name}", lambda bad=bad: ops.mae_unshuffle_backward(grad_dec, bad, 2, torch.float32,
                                                                                     torch.float32),
             "ids_restore must be a permutation"),
        ]
    return cases


BAD_CALLS = _bad_native_calls()


@needs_native
@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_native_op_called_directly_refuses_bad_arguments(case):
    _, thunk, match = case
    with pytest.raises(RuntimeError, match=match):
        thunk()


@needs_native
def test_native_gather_rows_masks_out_of_range_ids():
    """gather_rows' contract: an id outside [0, S) selects nothing (a zero row), it never addresses memory."""
    src = torch.randn(2, 6, 4)
    idx = torch.tensor([[0, -7, 9], [2 ** 40, 5, -1]])
    inverse = torch.tensor([[0, -1, -1, -1, -1, -1], [-1, -1, -1, -1, -1, 1]])
    add = torch.randn(1, 6, 4)
    out = ops.gather_rows(src, idx, inverse, add, None)
    expected = torch.zeros(2, 3, 4)
    expected[0, 0] = src[0, 0] + add[0, 0]
    expected[1, 1] = src[1, 5] + add[0, 5]
    torch.testing.assert_close(out, expected)


# --- ... and from torch.compile'd code, where the Python checks do not run -----------------------------------------

@needs_native
@pytest.mark.parametrize("bad", ["negative", "too-large", "repeated"])
def test_compiled_mae_unshuffle_refuses_bad_ids_restore(bad):
    """Under torch.compile the eager permutation check is skipped: the C++ op refuses, forward and backward."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    token = torch.randn(1, 1, 4, requires_grad=True)
    ids = _perm_rows(2, 5)
    ids[1, 2] = {"negative": -3, "too-large": 5, "repeated": ids[1, 3].item()}[bad]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def decode(x, ids, token):
        return vitkernels.mae_unshuffle(x, ids, token, backend="native")

    with pytest.raises(RuntimeError, match="ids_restore must be a permutation"):
        decode(x, ids, token)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def unshuffle_backward(grad, ids):
        return ops.mae_unshuffle_backward(grad, ids, 2, torch.float32, torch.float32)

    with pytest.raises(RuntimeError, match="ids_restore must be a permutation"):
        unshuffle_backward(torch.randn(2, 6, 4), ids)


@needs_native
def test_compiled_msn_patch_drop_refuses_a_repeated_permutation():
    x = torch.randn(2, 7, 4)
    perm = torch.tensor([0, 1, 1, 3, 4, 5])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def drop(x, perm):
        return vitkernels.msn_patch_drop(x, 0.5, perm, backend="native")[0]

    with pytest.raises(RuntimeError, match="inverse_idx must be the inverse of idx"):
        drop(x, perm)


@needs_native
def test_compiled_window_ops_take_shifts_larger_than_the_map():
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(x):
        windows = vitkernels.window_partition(x, (7, 5), (6, 4), backend="native")
        return windows, vitkernels.window_reverse(windows, 3, 2, (7, 5), (6, 4), backend="native")

    windows, back = roundtrip(x)
    torch.testing.assert_close(windows, vitkernels.window_partition(x, (7, 5), (6, 4), backend="reference"))
    torch.testing.assert_close(back, x, rtol=0, atol=0)


# --- second-order gradients -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dynamic_img_pad", [False, True])
def test_patch_embed_second_order_gradients_match_the_reference(backend, dynamic_img_pad):
    backend_or_skip(backend)
    dtype = torch.float64 if backend == "native" else torch.float32
    H = 10 if dynamic_img_pad else 8
    gh = -(-H // 4)
    inputs = [torch.randn(2, 3, H, 8), torch.randn(5, 3, 4, 4), torch.randn(5), torch.randn(1, 2 + gh * 2, 5),
              torch.randn(1, 2, 5)]

    def second_order(backend, dtype):
        x, w, b, pos, prefix = [t.to(dtype).requires_grad_() for t in inputs]
        out = vitkernels.patch_embed(x, w, b, pos, prefix, dynamic_img_pad=dynamic_img_pad, backend=backend)
        gx, gw = torch.autograd.grad((out * out.detach().cos()).sum() + out.pow(2).sum(), (x, w), create_graph=True)
        penalty = gx.pow(2).sum() + (gw * gw.detach().sin()).sum()
        return torch.autograd.grad(penalty, (x, w, b, pos, prefix), allow_unused=True)

    got = second_order(backend, dtype)
    want = second_order("reference", reference_dtype(dtype))
    for name, g, e in zip(("x", "weight", "bias", "pos_embed", "prefix_tokens"), got, want):
        assert (g is None) == (e is None), name  # bias, pos_embed, prefix_tokens: no second-order path
        if e is not None:
            torch.testing.assert_close(g.to(e.dtype), e, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                                       atol=1e-3 * max(1.0, e.abs().max().item()), msg=name)


@needs_native
def test_native_patch_embed_gradgradcheck():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    prefix = torch.randn(1, 3, dtype=torch.float64)

    def fn(x, w):
        return vitkernels.patch_embed(x, w, None, None, prefix, dynamic_img_pad=True, backend="native")

    assert torch.autograd.gradgradcheck(fn, (x, w))


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_window_attention_refuses_second_order_gradients(backend):
    backend_or_skip(backend)
    qkv = torch.randn(1, 4, 4, 96, requires_grad=True)
    table = torch.randn(9, 2, requires_grad=True)
    out = vitkernels.window_attention(qkv, table, 2, 1, 2, backend=backend)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), qkv, create_graph=True)  # create_graph alone is fine
    with pytest.raises(NotImplementedError, match=f"double backward .* {backend} backend of window_attention"):
        torch.autograd.grad(grad.pow(2).sum(), qkv)
    # the reference backend computes them
    out = vitkernels.window_attention(qkv, table, 2, 1, 2, backend="reference")
    (grad,) = torch.autograd.grad(out.pow(2).sum(), qkv, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), qkv)
    assert second.abs().sum() > 0


# Ops whose native first-order gradient is a backward kernel without a gradient of its own: differentiating it again
# (e.g. a gradient penalty on a block's input) must raise, never contribute silent zeros (the C++ backward ops have
# no autograd formula; PyTorch would only warn).
def _row_op_second_order_cases():
    from vitkernels.ops.bias_gelu import bias_gelu
    from vitkernels.ops.bias_layernorm_residual import bias_layernorm_residual
    from vitkernels.ops.bias_residual_layernorm import bias_residual_layernorm
    from vitkernels.ops.patch_merging import patch_merging_norm

    x, bias = torch.randn(2, 5, 8, requires_grad=True), torch.randn(8)
    weight, ln_bias = torch.randn(8), torch.randn(8)
    return {
        "bias_gelu": (lambda be: bias_gelu(x, bias, backend=be), x),
        "bias_residual_layernorm": (lambda be: bias_residual_layernorm(x, bias, torch.randn(2, 5, 8), weight, ln_bias,
                                                                       backend=be)[1], x),
        "bias_layernorm_residual": (lambda be: bias_layernorm_residual(x, bias, torch.randn(2, 5, 8), weight, ln_bias,
                                                                       backend=be), x),
        "patch_merging_norm": (lambda be: patch_merging_norm(x.reshape(2, 5, 4, 2)[:, :4], torch.randn(8),
                                                             torch.randn(8), backend=be), x),
        "window_attention_v2": (lambda be: vitkernels.window_attention_v2(x.reshape(1, 2, 5, 8)[..., :6].contiguous(),
                                                                          torch.randn(3 * 9, 2), torch.rand(2) + 1,
                                                                          (2, 5), (0, 0), 2, backend=be), x),
    }


@needs_native
@pytest.mark.parametrize("name", ["bias_gelu", "bias_residual_layernorm", "bias_layernorm_residual",
                                  "patch_merging_norm", "window_attention_v2"])
def test_native_row_ops_refuse_second_order_gradients(name):
    fn, x = _row_op_second_order_cases()[name]
    (grad,) = torch.autograd.grad(fn("native").pow(2).sum(), x, create_graph=True)  # create_graph alone is fine
    with pytest.raises(NotImplementedError, match=f"double backward .* native backend of {name}"):
        torch.autograd.grad(grad.pow(2).sum(), x)
    # the reference backend computes them
    (grad,) = torch.autograd.grad(fn("reference").pow(2).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), x)
    assert second.abs().sum() > 0


@needs_native
def test_every_native_op_has_an_autograd_kernel():
    """An op without an autograd kernel is differentiated by PyTorch's fallback, which only warns and treats it as
    constant: silently wrong (zero) gradients. Every op that takes tensors registers a formula, a refusal, or is
    composite (differentiated through the ops it calls)."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("vitkernels::")]
    assert len(names) > 20

    def has(name, key):
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)

    missing = [n for n in names if n != "vitkernels::build_info"
               and not any(has(n, key) for key in ("Autograd", "AutogradCPU", "CompositeImplicitAutograd"))]
    assert missing == []


INPLACE_VARIANTS = {
    "bias_gelu_": lambda y, b, r, out: ops.bias_gelu_(y, b, "none"),
    "bias_residual_": lambda y, b, r, out: ops.bias_residual_(y, b, r, None),
    "bias_residual_layernorm_": lambda y, b, r, out: ops.bias_residual_layernorm_(y, b, r, None, None, None, 1e-5, out),
    "bias_layernorm_residual_": lambda y, b, r, out: ops.bias_layernorm_residual_(y, b, r, None, None, None, 1e-5),
}


@needs_native
@pytest.mark.parametrize("name", sorted(INPLACE_VARIANTS))
def test_native_inplace_variants_refuse_tensors_that_require_grad(name):
    """The in-place inference variants have no gradient: called on a tensor that requires grad they raise (naming
    the argument and the differentiable op) instead of leaving the mutated tensor's history as it was."""
    call = INPLACE_VARIANTS[name]
    leaf = torch.randn(3, 8, requires_grad=True)
    y, b, r, out = leaf * 1, torch.randn(8), torch.randn(3, 8), torch.empty(3, 8)
    with pytest.raises(RuntimeError, match=f"vitkernels::{name}: argument 'y|x' requires grad.*call "
                                           f"vitkernels::{name[:-1]} "):
        call(y, b, r, out)
    bias = torch.randn(8, requires_grad=True)
    with pytest.raises(RuntimeError, match="argument 'bias' requires grad"):
        call(torch.randn(3, 8), bias, r, out)
    # without autograd they run, and bump the version of what they write
    with torch.no_grad():
        y = leaf * 1
        before = y._version
        call(y, bias, r, out)
    assert y._version > before
    with torch.inference_mode():
        call(torch.randn(3, 8), b, r, torch.empty(3, 8))


@needs_native
@pytest.mark.parametrize("name", sorted(INPLACE_VARIANTS))
def test_native_inplace_variants_overwriting_a_saved_tensor_are_detected(name):
    """A tensor saved for another op's backward and then overwritten by an in-place variant is reported by autograd
    (version counter), as for PyTorch's own in-place ops, not differentiated with the overwritten values."""
    weight = torch.randn(8, requires_grad=True)
    y = torch.randn(3, 8)
    product = y * weight  # saves y
    INPLACE_VARIANTS[name](y, torch.randn(8), torch.randn(3, 8), torch.empty(3, 8))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.sum().backward()


def test_triton_losses_refuse_second_order_gradients():
    backend_or_skip("triton")
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48, requires_grad=True)
    mask = torch.randint(0, 2, (2, 4)).float()
    loss = vitkernels.mae_loss(imgs, pred, mask, 4, backend="triton")
    (grad,) = torch.autograd.grad(loss, pred, create_graph=True)
    with pytest.raises(NotImplementedError, match="triton backend of mae_loss"):
        torch.autograd.grad(grad.pow(2).sum(), pred)


# --- edge cases -----------------------------------------------------------------------------------------------------

EMPTY_CASES = {
    "partition-B0": lambda be: vitkernels.window_partition(torch.randn(0, 4, 5, 3), 3, 1, backend=be),
    "partition-C0": lambda be: vitkernels.window_partition(torch.randn(2, 4, 5, 0), 3, 1, backend=be),
    "reverse-B0": lambda be: vitkernels.window_reverse(torch.randn(0, 9, 3), 4, 5, 3, 1, backend=be),
    "reverse-C0": lambda be: vitkernels.window_reverse(torch.randn(8, 9, 0), 4, 5, 3, 1, backend=be),
    "attention-B0": lambda be: vitkernels.window_attention(torch.randn(0, 4, 5, 96), torch.randn(25, 2), 3, 1, 2,
                                                           backend=be),
    "random-masking-B0": lambda be: vitkernels.random_masking(torch.randn(0, 8, 4), 0.5, backend=be)[0],
    "random-masking-D0": lambda be: vitkernels.random_masking(torch.randn(2, 8, 0), 0.5, backend=be)[0],
    "unshuffle-B0": lambda be: vitkernels.mae_unshuffle(torch.randn(0, 3, 4), torch.zeros(0, 8, dtype=torch.long),
                                                        torch.randn(4), backend=be),
    "unshuffle-D0": lambda be: vitkernels.mae_unshuffle(torch.randn(2, 3, 0), _perm_rows(2, 8), torch.randn(0),
                                                        backend=be),
    "patch-drop-B0": lambda be: vitkernels.msn_patch_drop(torch.randn(0, 9, 4), 0.5, torch.randperm(8),
                                                          backend=be)[0],
    "patch-embed-B0": lambda be: vitkernels.patch_embed(torch.randn(0, 3, 8, 8), torch.randn(5, 3, 4, 4),
                                                        backend=be),
}


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("case", sorted(EMPTY_CASES))
def test_empty_batch_and_channels_give_empty_results_like_the_reference(case, backend):
    backend_or_skip(backend)
    torch.manual_seed(0)
    expected = EMPTY_CASES[case]("reference")
    torch.manual_seed(0)
    out = EMPTY_CASES[case](backend)
    assert out.numel() == 0 and out.shape == expected.shape and out.dtype == expected.dtype


@needs_native
def test_empty_batch_backward():
    x = torch.randn(0, 4, 5, 3, requires_grad=True)
    vitkernels.window_partition(x, 3, 1, backend="native").sum().backward()
    assert x.grad.shape == x.shape
    qkv = torch.randn(0, 4, 5, 96, requires_grad=True)
    table = torch.randn(25, 2, requires_grad=True)
    vitkernels.window_attention(qkv, table, 3, 1, 2, backend="native").sum().backward()
    assert qkv.grad.shape == qkv.shape
    torch.testing.assert_close(table.grad, torch.zeros_like(table))


def _layouts(x):
    """The same values in unusual layouts: (name, tensor)."""
    big = torch.cat([x, x], dim=-1)
    return [
        ("contiguous", x),
        ("channels-last", x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x),
        ("transposed-copy", x.transpose(1, 2).contiguous().transpose(1, 2)),
        ("sliced", big[..., : x.shape[-1]]),
        ("flipped", x.flip(1).flip(1)),
        ("expanded", x[:1].expand(x.shape)),
    ]


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "transposed-copy", "sliced", "flipped", "expanded"])
def test_native_ops_on_unusual_layouts_match_the_reference(layout):
    torch.manual_seed(1)
    x = dict(_layouts(torch.randn(2, 5, 6, 24, dtype=torch.float64)))[layout]
    table = torch.randn(25, 2, dtype=torch.float64)
    token = torch.randn(24, dtype=torch.float64)
    weight = torch.randn(7, 3, 2, 3, dtype=torch.float64)
    noise = torch.rand(2, 30, dtype=torch.float64)

    def run(backend):
        tokens = x.flatten(1, 2)  # (2, 30, 24), a view of x's layout
        x_masked, mask, ids = vitkernels.random_masking(tokens, 0.6, noise, backend=backend)
        return [
            vitkernels.window_partition(x, 3, (2, 1), backend=backend),
            vitkernels.window_attention(x, table, 3, (2, 1), 2, backend=backend),
            x_masked, mask, ids,
            vitkernels.mae_unshuffle(tokens[:, :13], ids, token, backend=backend),
            vitkernels.msn_patch_drop(tokens, 0.5, torch.arange(28, -1, -1), backend=backend)[0],
            # a strided NCHW view, padded to whole patches
            vitkernels.patch_embed(x.permute(0, 3, 1, 2)[:, :3], weight, dynamic_img_pad=True, backend=backend),
        ]

    for got, want in zip(run("native"), run("reference")):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# --- clear errors for what used to be unclear ones --------------------------------------------------------------------

@pytest.mark.parametrize(
    "thunk,exc,match",
    [
        (lambda: vitkernels.window_partition(torch.randn(1, 3, 3, 4), (2 ** 62, 4)), ValueError,
         "window_size .* too large"),
        (lambda: vitkernels.window_reverse(torch.randn(1, 4, 2), 3, 3, (2 ** 62, 4)), ValueError,
         "window_size .* too large"),
        (lambda: vitkernels.window_attention(torch.randn(1, 4, 4, 0), torch.randn(9, 2), 2, 0, 2), ValueError,
         "head_dim >= 1"),
        (lambda: vitkernels.window_partition(torch.randn(1, 3, 3, 4), 2, backend=123), TypeError, "backend must be"),
        (lambda: vitkernels.SwinBlock(dim=2, input_resolution=4, num_heads=4), ValueError, "head_dim"),
        (lambda: vitkernels.SwinBlock(dim=32, input_resolution=4, num_heads=2, window_size=2)(torch.randn(2, 16, 32)),
         ValueError, "\\(B, L, C\\) tokens"),
        (lambda: vitkernels.SwinBlock(dim=32, input_resolution=4, num_heads=2, window_size=2)(
            torch.randn(2, 32, 4, 4)), ValueError, "NCHW"),
        (lambda: vitkernels.SwinBlock(dim=32, input_resolution=4, num_heads=2, window_size=2)("x"), TypeError,
         "x must be a torch.Tensor"),
    ],
    ids=["partition-overflow", "reverse-overflow", "head-dim-0", "backend-int", "block-head-dim-0", "block-BLC",
         "block-NCHW", "block-not-a-tensor"],
)
def test_clear_errors(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_swin_block_with_an_empty_batch(backend):
    backend_or_skip(backend)
    block = vitkernels.SwinBlock(dim=32, input_resolution=4, num_heads=2, window_size=2, shift_size=1, backend=backend)
    x = torch.randn(0, 4, 4, 32, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    with torch.no_grad():
        assert block.eval()(x).shape == x.shape


# --- NaN / Inf ----------------------------------------------------------------------------------------------------

@needs_native
def test_native_window_attention_propagates_nan_and_inf_like_the_reference():
    """Non-finite values reach the same outputs as in the reference. The one documented difference (README): +-Inf
    in v of a token whose probability is below e^-80 of the row maximum (e.g. one masked across shifted-window
    regions, -100) gives NaN natively, +-Inf in the reference (whose e^-100 is a subnormal float, not 0)."""
    torch.manual_seed(3)
    for poison in (float("nan"), float("inf"), -float("inf")):
        for part in range(3):  # q, k, v
            qkv = torch.randn(1, 4, 4, 12)
            qkv[0, 1, 2, part * 4 + 1] = poison
            table = torch.randn(9, 2)
            got = vitkernels.window_attention(qkv, table, 2, 0, 2, backend="native")  # no shift: no mask
            want = vitkernels.window_attention(qkv.double(), table.double(), 2, 0, 2, backend="reference")
            assert torch.equal(got.isnan(), want.isnan()), (poison, part)
            assert torch.equal(got.isinf(), want.isinf()), (poison, part)
            finite = want.isfinite()
            torch.testing.assert_close(got[finite].double(), want[finite], rtol=2e-4, atol=2e-5)


@needs_native
def test_native_masking_propagates_nan():
    x = torch.randn(2, 6, 4)
    x[1, 3, 2] = float("nan")
    noise = torch.rand(2, 6)
    got = vitkernels.random_masking(x, 0.5, noise, backend="native")
    want = vitkernels.random_masking(x, 0.5, noise, backend="reference")
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    noise[0, 2] = float("nan")  # NaN noise sorts last in both (a stable sort)
    got = vitkernels.random_masking(x, 0.5, noise, backend="native")
    want = vitkernels.random_masking(x, 0.5, noise, backend="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)

