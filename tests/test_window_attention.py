"""window_attention: the reference op vs an independent per-token coordinate formulation, vs timm's block,
gradients, and argument errors. Fast backends add their own cases to this file's parametrisation as they land."""
import pytest
import torch

import vitkernels
from vitkernels.reference import window_attention as reference

from fused_ops_helpers import CPU_ISAS, selected_cpu_isa, use_cpu_isa
from helpers import assert_close_scaled, import_timm

CASES = [  # (B, H, W, num_heads, head_dim, window, shift)
    (2, 14, 14, 2, 4, (7, 7), (3, 3)),
    (1, 9, 10, 3, 5, (7, 7), (3, 3)),   # padding on both axes, shifted
    (2, 5, 11, 2, 3, (3, 4), (1, 2)),   # non-square window
    (1, 7, 7, 1, 8, (7, 7), (0, 0)),    # one window
    (1, 12, 9, 2, 4, (4, 4), (2, 0)),   # shift on one axis only (timm: the other axis has one region)
    (1, 6, 6, 2, 4, (4, 4), (0, 0)),    # padding without shift
]


def region(coord, padded, window, shift):
    if shift == 0:
        return 0
    return 0 if coord < padded - window else (1 if coord < padded - shift else 2)


def attention_by_coordinates(qkv, table, window, shift, num_heads, scale, qkv_bias):
    """Every token attends to the tokens of its shifted window, found from coordinates (no roll, pad, partition)."""
    B, H, W, three_c = qkv.shape
    wh, ww = window
    sh, sw = shift
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    hd = three_c // (3 * num_heads)
    pad_token = qkv_bias if qkv_bias is not None else qkv.new_zeros(three_c)
    out = torch.empty(B, H, W, num_heads * hd, dtype=qkv.dtype)
    for y in range(H):
        for x in range(W):
            r, s = (y - sh) % H, (x - sw) % W  # this token's padded, shifted coordinate
            r0, s0 = r - r % wh, s - s % ww
            members, logits_bias = [], []
            for r2 in range(r0, r0 + wh):
                for s2 in range(s0, s0 + ww):
                    members.append(qkv[:, (r2 + sh) % H, (s2 + sw) % W] if (r2 < H and s2 < W)
                                   else pad_token.expand(B, three_c))
                    rel = (r - r2 + wh - 1) * (2 * ww - 1) + (s - s2 + ww - 1)
                    same = (region(r, Hp, wh, sh), region(s, Wp, ww, sw)) == (region(r2, Hp, wh, sh), region(s2, Wp, ww, sw))
                    logits_bias.append(table[rel] + (0.0 if same else -100.0))
            keys = torch.stack(members, 1).view(B, len(members), 3, num_heads, hd)
            bias = torch.stack(logits_bias, 0).T  # nH, N
            q = qkv[:, y, x].view(B, 3, num_heads, hd)[:, 0] * scale  # B, nH, hd
            logits = torch.einsum("bhd,bnhd->bhn", q, keys[:, :, 1]) + bias
            out[:, y, x] = torch.einsum("bhn,bnhd->bhd", logits.softmax(-1), keys[:, :, 2]).reshape(B, -1)
    return out


def make_inputs(case, dtype=torch.float64, device="cpu", with_bias=True):
    B, H, W, nH, hd, window, shift = case
    qkv = torch.randn(B, H, W, 3 * nH * hd, dtype=dtype, device=device)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), nH, dtype=dtype, device=device)
    bias = torch.randn(3 * nH * hd, dtype=dtype, device=device) if with_bias else None
    return qkv, table, bias


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}w{c[5]}s{c[6]}" for c in CASES])
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_matches_coordinate_formulation(case, with_bias):
    qkv, table, bias = make_inputs(case, with_bias=with_bias)
    _, _, _, nH, hd, window, shift = case
    scale = hd ** -0.5
    out = vitkernels.window_attention(qkv, table, window, shift, nH, qkv_bias=bias, backend="reference")
    expected = attention_by_coordinates(qkv, table, window, shift, nH, scale, bias)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_reference_mask_matches_coordinate_regions():
    """The slice-built mask equals the region rule stated in the module docstring, incl. a zero shift on one axis."""
    for Hp, Wp, window, shift in [(14, 14, (7, 7), (3, 3)), (12, 8, (4, 4), (2, 0)), (6, 8, (3, 4), (1, 2))]:
        mask = reference.shifted_window_mask(Hp, Wp, window, shift, dtype=torch.float64)
        ids = torch.tensor([[3 * region(r, Hp, window[0], shift[0]) + region(s, Wp, window[1], shift[1])
                             for s in range(Wp)] for r in range(Hp)], dtype=torch.float64)
        ids = vitkernels.reference.window_partition.window_partition(ids[None, :, :, None], window).squeeze(-1)
        expected = torch.where(ids[:, :, None] == ids[:, None, :], 0.0, -100.0).to(torch.float64)
        torch.testing.assert_close(mask, expected, rtol=0, atol=0)


def test_relative_position_index_formula():
    for wh, ww in [(7, 7), (3, 5)]:
        index = reference.relative_position_index(wh, ww)
        ys, xs = torch.arange(wh * ww) // ww, torch.arange(wh * ww) % ww
        expected = (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)
        assert torch.equal(index, expected)


def test_reference_gradients():
    case = (1, 5, 6, 2, 3, (4, 4), (2, 1))
    qkv, table, bias = make_inputs(case)
    inputs = tuple(t.requires_grad_() for t in (qkv, table, bias))
    assert torch.autograd.gradcheck(
        lambda a, b, c: vitkernels.window_attention(a, b, (4, 4), (2, 1), 2, qkv_bias=c, backend="reference"), inputs
    )


@pytest.mark.timm
@pytest.mark.parametrize("res,window,shift", [((14, 14), 7, 3), ((9, 10), 7, 3), ((14, 7), 7, 3)])
def test_op_plus_linears_equals_timm_block_attention(res, window, shift):
    import_timm()
    from timm.models.swin_transformer import SwinTransformerBlock

    block = SwinTransformerBlock(24, res, 3, window_size=window, shift_size=shift).double()
    x = torch.randn(2, *res, 24, dtype=torch.float64)
    attn = block.attn
    out = attn.proj(vitkernels.window_attention(
        attn.qkv(x), attn.relative_position_bias_table, block.window_size, block.shift_size, attn.num_heads,
        attn.scale, attn.qkv.bias, backend="reference"))
    torch.testing.assert_close(out, block._attn(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(qkv=a["qkv"][0]), ValueError, "qkv must have 4 dimensions"),
        (lambda a: a.update(qkv=a["qkv"].int()), TypeError, "qkv must have dtype"),
        (lambda a: a.update(num_heads=5), ValueError, "3 \\* num_heads \\* head_dim"),
        (lambda a: a.update(num_heads=0), ValueError, "num_heads must be >= 1"),
        (lambda a: a.update(table=a["table"][:-1]), ValueError, "relative_position_bias_table must have shape"),
        (lambda a: a.update(window_size=0), ValueError, "window_size must be positive"),
        (lambda a: a.update(shift_size=7), ValueError, "shift_size must be smaller"),
        (lambda a: a.update(qkv_bias=torch.randn(5)), ValueError, "qkv_bias must have shape"),
        (lambda a: a.update(table=a["table"].to("meta")), ValueError, "on one device"),
        (lambda a: a.update(scale="x"), TypeError, "scale must be a float"),
    ],
)
def test_bad_inputs(mutate, exc, match):
    qkv, table, bias = make_inputs((1, 9, 10, 2, 4, (7, 7), (3, 3)), dtype=torch.float32)
    args = dict(qkv=qkv, table=table, window_size=7, shift_size=3, num_heads=2, scale=None, qkv_bias=bias)
    mutate(args)
    with pytest.raises(exc, match=match):
        vitkernels.window_attention(args["qkv"], args["table"], args["window_size"], args["shift_size"],
                                    args["num_heads"], args["scale"], args["qkv_bias"])


# === Triton kernels (CPU interpreter on tiny shapes; CUDA when present) ==========================================

from helpers import triton_interpreter_or_cuda  # noqa: E402

TRITON_CASES = [  # (B, H, W, num_heads, head_dim, window, shift)
    (1, 14, 14, 2, 16, (7, 7), (3, 3)),
    (1, 9, 10, 2, 16, (7, 7), (3, 3)),     # padding (qkv-bias tokens), shifted
    (2, 5, 11, 1, 16, (3, 4), (1, 2)),     # non-square window, several images
    (1, 12, 9, 1, 16, (4, 4), (2, 0)),     # shift on one axis only
    (1, 7, 7, 1, 32, (7, 7), (0, 0)),      # one window, head_dim 32
    (1, 13, 12, 1, 16, (12, 12), (6, 6)),  # ws 12: N = 144 > one query tile (atomic bias-gradient path), padding
]


def run_forward_backward(case, dtype, backend, table_dtype=None, with_bias=True, grad=None, device="cpu"):
    """Forward and the gradients of (qkv, table, qkv_bias) of one case; None where an input does not exist."""
    B, H, W, nH, hd, window, shift = case
    torch.manual_seed(1)
    qkv = torch.randn(B, H, W, 3 * nH * hd, device=device).to(dtype).requires_grad_()
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), nH, device=device).to(table_dtype or dtype)
    table.requires_grad_()
    bias = torch.randn(3 * nH * hd, device=device).to(table_dtype or dtype).requires_grad_() if with_bias else None
    out = vitkernels.window_attention(qkv, table, window, shift, nH, qkv_bias=bias, backend=backend)
    if grad is None:
        grad = torch.randn(out.shape, device=device)
    leaves = [t for t in (qkv, table, bias) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out, grads, grad, (qkv, table, bias)


def check_against_reference(case, dtype, backend, table_dtype=None, with_bias=True, device="cpu", error_ratio=None):
    """The fast backend vs the float64 reference (fp32 for half). For half inputs the error is also bounded by a
    multiple of eager PyTorch's own error in that dtype (flash-attn's rule), when ``error_ratio`` is given."""
    out, grads, grad, inputs = run_forward_backward(case, dtype, backend, table_dtype, with_bias, device=device)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    ref_out, ref_grads, _, _ = run_forward_backward(case, ref_dtype, "reference", with_bias=with_bias, grad=grad,
                                                    device=device)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert [g.dtype for g in grads] == [t.dtype for t in inputs if t is not None]
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-4 * max(1.0, rg.abs().max().item()))
        return
    eager_out, eager_grads, _, _ = run_forward_backward(case, dtype, "reference", with_bias=with_bias, grad=grad,
                                                        device=device)
    for name, ours, eager, ref in [("out", out, eager_out, ref_out)] + [
        (f"grad{i}", g, eg, rg) for i, (g, eg, rg) in enumerate(zip(grads, eager_grads, ref_grads))
    ]:
        our_err = (ours.float() - ref).abs().max().item()
        eager_err = (eager.float() - ref).abs().max().item()
        bound = error_ratio * eager_err + 1e-3 * max(1.0, ref.abs().max().item())
        assert our_err <= bound, f"{name}: error {our_err:.3g} > {error_ratio} x eager {eager_err:.3g} (+atol)"


# The Triton tests run on the GPU where there is one (the real triton_op path), else under the interpreter.
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_SINGLE_WINDOW_CASES = [  # one window each, so the interpreter stays fast
    (1, 7, 7, 1, 64, (7, 7), (3, 3)),      # head_dim 64
    (1, 12, 12, 1, 64, (12, 12), (0, 0)),  # ws 12 with head_dim 64
    (1, 16, 16, 1, 16, (16, 16), (8, 8)),  # N = 256, the largest window
]


@pytest.mark.parametrize("case", TRITON_CASES + TRITON_SINGLE_WINDOW_CASES,
                         ids=[f"{c[1]}x{c[2]}w{c[5]}s{c[6]}hd{c[4]}" for c in TRITON_CASES + TRITON_SINGLE_WINDOW_CASES])
def test_triton_fp32_matches_reference(case):
    triton_interpreter_or_cuda(TRITON_DEV)
    check_against_reference(case, torch.float32, "triton", device=TRITON_DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [None, torch.float32], ids=["same", "fp32-params"])
def test_triton_half_matches_reference(dtype, table_dtype):
    triton_interpreter_or_cuda(TRITON_DEV)
    # The interpreter truncates fp32 -> bf16 casts instead of rounding: up to ~2x the rounding error, so the CPU
    # bound is 3x eager PyTorch's error; on CUDA flash-attn's 2x.
    check_against_reference(TRITON_CASES[1], dtype, "triton", table_dtype=table_dtype, device=TRITON_DEV,
                            error_ratio=2.0 if TRITON_DEV == "cuda" else 3.0)


def test_triton_without_qkv_bias():
    triton_interpreter_or_cuda(TRITON_DEV)
    check_against_reference(TRITON_CASES[1], torch.float32, "triton", with_bias=False, device=TRITON_DEV)


def test_triton_opcheck():
    """Forward and backward custom ops (on a GPU: the triton_op / wrap_triton path torch.compile traces)."""
    triton_interpreter_or_cuda(TRITON_DEV)
    # one padded, shifted 4x4 window of one head: opcheck runs the ops ~40 times, each program interpreted op by op
    # (4 windows x 2 heads of 7x7: ~12 s); the numbers are the other tests'
    qkv = torch.randn(1, 3, 4, 48, device=TRITON_DEV, requires_grad=True)
    table = torch.randn(49, 1, device=TRITON_DEV, requires_grad=True)
    bias = torch.randn(48, device=TRITON_DEV, requires_grad=True)
    for b in (bias, None):
        args = (qkv, table, b, [4, 4], [2, 2], 1, 0.25)
        torch.library.opcheck(torch.ops.vitkernels.triton_window_attention.default, args)
        with torch.no_grad():
            out, lse = torch.ops.vitkernels.triton_window_attention(*args)
        grad = torch.randn_like(out)
        torch.library.opcheck(torch.ops.vitkernels.triton_window_attention_backward.default,
                              (grad, qkv.detach(), table.detach(), b.detach() if b is not None else None, out, lse,
                               [4, 4], [2, 2], 1, 0.25))
        # inference: no log-sum-exp computed or stored (an empty tensor), the fake agrees
        plain = (qkv.detach(), table.detach(), b.detach() if b is not None else None, [4, 4], [2, 2], 1, 0.25, False)
        torch.library.opcheck(torch.ops.vitkernels.triton_window_attention.default, plain)
        out_inf, lse_inf = torch.ops.vitkernels.triton_window_attention(*plain)
        assert lse_inf.numel() == 0 and torch.equal(out_inf, out)


def assert_block_compiles_fullgraph(backend, device, compiler, tol):
    """A SwinBlock on ``backend`` compiled with fullgraph=True: forward and input gradient equal the reference
    block's (same weights)."""
    torch._dynamo.reset()
    block = vitkernels.SwinBlock(32, (9, 10), 2, window_size=7, shift_size=3, backend=backend).to(device)
    ref = vitkernels.SwinBlock(32, (9, 10), 2, window_size=7, shift_size=3, backend="reference").to(device)
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


def test_triton_swin_block_compiles_fullgraph():
    """fullgraph compile of a block on the Triton op, forward and backward: inductor on a GPU, aot_eager under the
    interpreter (inductor cannot trace the interpreter's data-pointer-based launches)."""
    triton_interpreter_or_cuda(TRITON_DEV)
    assert_block_compiles_fullgraph("triton", TRITON_DEV, "inductor" if TRITON_DEV == "cuda" else "aot_eager", 1e-4)


def test_triton_unsupported_configurations_fall_back_with_reasons():
    call = vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, {"head_dim": 24, "tokens_per_window": 49})
    from vitkernels.ops.window_attention import op

    reason = op.reasons(call)["triton"]
    assert reason is not None and ("head_dim 24" in reason or "triton" in reason.lower())
    from vitkernels.triton import HAS_TRITON

    if HAS_TRITON:
        from vitkernels.triton import window_attention as kernels

        assert "head_dim 24" in kernels.supported_reason(24, 49, torch.float32)
        assert "257 tokens" in kernels.supported_reason(32, 257, torch.float32)
        assert "float64" in kernels.supported_reason(32, 49, torch.float64)
        assert kernels.supported_reason(32, 144, torch.bfloat16) is None


CUDA_CASES = [  # Swin-T stage 1 and 3 shapes (scaled batch), Swin-B 384 window 12, padding
    (4, 56, 56, 3, 32, (7, 7), (3, 3)),
    (8, 14, 14, 12, 32, (7, 7), (3, 3)),
    (2, 24, 24, 4, 32, (12, 12), (6, 6)),
    (2, 30, 27, 2, 64, (7, 7), (0, 0)),
    (2, 30, 27, 2, 64, (7, 7), (3, 3)),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[f"{c[1]}x{c[2]}w{c[5]}s{c[6]}hd{c[4]}" for c in CUDA_CASES])
def test_triton_cuda_matches_reference(case, dtype):
    check_against_reference(case, dtype, "triton", device="cuda", error_ratio=2.0)


@pytest.mark.cuda
def test_triton_cuda_grid_beyond_65535_windows():
    # 1 x 7 x (7 * 70000) image: 70,000 windows on one grid axis
    check_against_reference((1, 7, 7 * 70000, 1, 16, (7, 7), (0, 0)), torch.float16, "triton", device="cuda",
                            error_ratio=2.0)


@pytest.mark.cuda
def test_triton_cuda_int64_offsets():
    """qkv with more than 2**31 elements: offsets past 2**31 must not wrap, forward and backward."""
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip("needs ~32 GiB of free GPU memory")
    H, W, nH, hd = 448, 448, 6, 64  # 231,211,008 qkv elements per image
    B = -(-(2**31 + 1) // (H * W * 3 * nH * hd))  # 10 images: ~2.3e9 elements
    qkv = torch.randn(B, H, W, 3 * nH * hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert qkv.numel() > 2**31
    table = torch.randn(169, nH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = vitkernels.window_attention(qkv, table, 7, 3, nH, backend="triton")
    # only the last image (offsets beyond 2**31) gets a gradient: its grads and the table's come from it alone
    grad = torch.zeros_like(out)
    grad[-1].normal_()
    grad_qkv, grad_table = torch.autograd.grad(out, (qkv, table), grad)
    q_ref = qkv[-1:].detach().float().requires_grad_()
    t_ref = table.detach().float().requires_grad_()
    ref = vitkernels.window_attention(q_ref, t_ref, 7, 3, nH, backend="reference")
    ref_qkv, ref_table = torch.autograd.grad(ref, (q_ref, t_ref), grad[-1:].float())
    torch.testing.assert_close(out[-1:].float(), ref.detach(), rtol=2e-2, atol=2e-2)
    assert_close_scaled(grad_qkv[-1:].float(), ref_qkv, torch.bfloat16)
    assert_close_scaled(grad_table.float(), ref_table, torch.bfloat16)
    assert grad_qkv[:-1].abs().max().item() == 0.0


# === Native kernels (csrc/cpu/window_attention.cpp; CUDA when built with it) =====================================

from vitkernels import _native  # noqa: E402

NATIVE_CASES = CASES + TRITON_CASES + [
    (2, 56, 56, 3, 32, (7, 7), (3, 3)),    # Swin-T stage 1 (batch 2)
    (2, 14, 14, 12, 32, (7, 7), (3, 3)),   # Swin-T stage 3
    (1, 30, 27, 2, 64, (7, 7), (3, 3)),    # head_dim 64, padding on both axes
    (1, 17, 16, 1, 8, (16, 16), (8, 8)),   # N = 256, the largest window the Triton kernel takes
    (3, 4, 4, 2, 24, (4, 4), (0, 0)),      # one window per image, head_dim not a multiple of 16
]


def native_or_skip(device="cpu"):
    reason = _native.native_unavailable_reason("window_attention", torch.device(device))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("case", NATIVE_CASES, ids=[f"b{c[0]}-{c[1]}x{c[2]}w{c[5]}s{c[6]}h{c[3]}hd{c[4]}"
                                                    for c in NATIVE_CASES])
def test_native_fp32_matches_reference(case):
    native_or_skip()
    check_against_reference(case, torch.float32, "native")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", [CASES[1], TRITON_CASES[5], (1, 9, 10, 2, 24, (7, 7), (3, 3))],
                         ids=["pad-shift-hd5", "w12-N144", "hd24"])
def test_native_every_instruction_set_matches_reference(case, isa, monkeypatch):
    """The kernel body is compiled for AVX-512, AVX2 and the baseline; VITKERNELS_CPU_ISA caps the choice, so every
    build this CPU can run is checked (a cap above what the CPU has runs the best it has)."""
    native_or_skip()
    use_cpu_isa(monkeypatch, isa)
    assert selected_cpu_isa() == isa  # (use_cpu_isa skipped the builds this CPU cannot run)
    check_against_reference(case, torch.float32, "native")


def test_native_rejects_unknown_instruction_set(monkeypatch):
    native_or_skip()
    monkeypatch.setenv("VITKERNELS_CPU_ISA", "avx9000")
    qkv, table, bias = make_inputs(CASES[0], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="VITKERNELS_CPU_ISA must be avx512, avx2 or baseline"):
        vitkernels.window_attention(qkv, table, 7, 3, 2, backend="native")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [None, torch.float32], ids=["same", "fp32-params"])
@pytest.mark.parametrize("case", [CASES[1], (2, 14, 14, 3, 32, (7, 7), (3, 3))], ids=["pad-shift", "14x14hd32"])
def test_native_half_matches_reference(case, dtype, table_dtype):
    """Half storage, fp32 math: within flash-attn's rule of 2x eager PyTorch's own error in that dtype."""
    native_or_skip()
    check_against_reference(case, dtype, "native", table_dtype=table_dtype, error_ratio=2.0)


def test_native_without_qkv_bias():
    native_or_skip()
    check_against_reference(CASES[1], torch.float32, "native", with_bias=False)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", [(1, 5, 6, 2, 3, (4, 4), (2, 1)), (2, 4, 7, 1, 4, (3, 3), (0, 0))],
                         ids=["pad-shift", "pad-noshift"])
def test_native_gradcheck_float64(case, isa, monkeypatch):
    native_or_skip()
    use_cpu_isa(monkeypatch, isa)
    B, H, W, nH, hd, window, shift = case
    qkv, table, bias = make_inputs(case)
    inputs = tuple(t.requires_grad_() for t in (qkv, table, bias))
    assert torch.autograd.gradcheck(
        lambda a, b, c: vitkernels.window_attention(a, b, window, shift, nH, qkv_bias=c, backend="native"), inputs
    )


@pytest.mark.parametrize("save_probs", [False, True], ids=["lse", "saved-softmax"])
def test_native_opcheck(save_probs):
    native_or_skip()
    qkv = torch.randn(1, 9, 10, 96, requires_grad=True)
    table = torch.randn(169, 2, requires_grad=True)
    bias = torch.randn(96, requires_grad=True)
    for b in (bias, None):
        torch.library.opcheck(torch.ops.vitkernels.window_attention.default,
                              (qkv, table, b, [7, 7], [3, 3], 2, 0.25, save_probs))


@pytest.mark.parametrize("with_bias", [True, False])
def test_native_training_saves_the_softmax_on_cpu(with_bias):
    """Training on CPU keeps the softmax (windows, heads, N, NP) for the backward instead of the row lse, so the
    backward reads P rather than recomputing S and its exp; inference (no gradient) keeps neither. The gradients
    through the saved softmax match the float64 reference."""
    native_or_skip()
    case = (2, 9, 10, 3, 16, (7, 7), (3, 3))
    B, H, W, nH, hd, window, shift = case
    qkv, table, bias = make_inputs(case)
    bias = bias if with_bias else None
    inputs = [t.requires_grad_() for t in (qkv, table, bias) if t is not None]
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = vitkernels.window_attention(qkv.float(), table.float(), window, shift, nH,
                                          qkv_bias=None if bias is None else bias.float(), backend="native")
    n_windows, N = B * 2 * 2, window[0] * window[1]
    assert (n_windows, nH, N, 64) in saved and (n_windows, nH, N) not in saved
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    expected_out = reference.window_attention(qkv, table, window, shift, nH, hd ** -0.5, bias)
    expected = torch.autograd.grad(expected_out, inputs, grad.double())
    torch.testing.assert_close(out, expected_out.float(), rtol=1e-4, atol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.no_grad():
        vitkernels.window_attention(qkv.float(), table.float(), window, shift, nH, backend="native")
    assert saved == []


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_native_swin_block_compiles_fullgraph(compiler):
    """The C++ op under torch.compile: no graph break, forward and backward, with inductor's generated code around
    it too (CPU inductor compiles C++: ~10 s)."""
    native_or_skip()
    assert_block_compiles_fullgraph("native", "cpu", compiler, 1e-5)


def test_native_is_the_cpu_default_and_matches_the_reference_block():
    """auto on CPU picks the native kernel for the fast SwinBlock; the block's output and gradients agree."""
    native_or_skip()
    from vitkernels.ops.window_attention import op

    call = vitkernels.dispatch.Call(torch.device("cpu"), torch.float32, {"head_dim": 32, "tokens_per_window": 49})
    assert op.auto_choice(call)[0] == "native"
    block = vitkernels.SwinBlock(96, (14, 14), 3, window_size=7, shift_size=3)
    ref = vitkernels.SwinBlock(96, (14, 14), 3, window_size=7, shift_size=3, backend="reference")
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 14, 14, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = block(x), ref(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(qkv=torch.randn(1, 7, 7, 95)), "is not 3 \\* num_heads \\* head_dim"),
        (dict(table=torch.randn(168, 1)), "relative_position_bias_table must be"),
        (dict(window_size=[7, 7, 7]), "window_size must be a pair"),
        (dict(shift_size=[7, 0]), "0 <= shift < window_size"),
        (dict(qkv_bias=torch.randn(5)), "qkv_bias must be"),
    ],
)
def test_native_op_checks_its_arguments(args, match):
    """The C++ op (reachable without the Python checks through torch.ops) refuses bad arguments with a message."""
    native_or_skip()
    call = dict(qkv=torch.randn(1, 7, 7, 96), table=torch.randn(169, 1), qkv_bias=None, window_size=[7, 7],
                shift_size=[3, 3], num_heads=1, scale=0.25)
    call.update(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vitkernels.window_attention(call["qkv"], call["table"], call["qkv_bias"], call["window_size"],
                                              call["shift_size"], call["num_heads"], call["scale"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[f"{c[1]}x{c[2]}w{c[5]}s{c[6]}hd{c[4]}" for c in CUDA_CASES])
def test_native_cuda_matches_reference(case, dtype):
    native_or_skip("cuda")
    check_against_reference(case, dtype, "native", device="cuda", error_ratio=2.0)


@pytest.mark.cuda
def test_native_cuda_grid_beyond_65535_windows():
    native_or_skip("cuda")
    check_against_reference((1, 7, 7 * 70000, 1, 16, (7, 7), (0, 0)), torch.float16, "native", device="cuda",
                            error_ratio=2.0)


def test_native_cuda_limits_are_reported_before_the_call():
    """The CUDA kernel's limits (N <= 256, head_dim <= 128) are support checks: auto falls back with the reason."""
    from vitkernels.ops.window_attention import op

    if not _native.is_loaded():
        pytest.skip(_native.IMPORT_ERROR)
    big = vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, {"head_dim": 32, "tokens_per_window": 289})
    wide = vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, {"head_dim": 160, "tokens_per_window": 49})
    reasons = op.reasons(big)["native"], op.reasons(wide)["native"]
    if _native.has_kernel("window_attention", "CUDA"):
        assert "at most 256 tokens" in reasons[0] and "head_dim <= 128" in reasons[1]
    else:
        assert all("CUDA" in r for r in reasons)
