"""3D shifted-window attention: the reference (vitkernels.reference.window_attention_3d), the fused native CPU op
(vitkernels.window_attention_3d, backend "native") and the Triton op (backend "triton": on CUDA, or on CPU tensors
under TRITON_INTERPRET=1) against an independent dense formulation from token coordinates and against MONAI's own
SwinUNETR modules (2D and 3D).

These are the tests a fused 3D kernel must pass: add it to ``IMPLEMENTATIONS`` (same signature as
:func:`window_attention_3d`) and every case below checks its output and its gradients (qkv, table, qkv_bias)
against the dense formulation in float64. An implementation that does not compute in float64 (Triton) lists its own
cases and tolerances in ``SETTINGS``.
"""
import importlib

import pytest
import torch

import vitkernels
from vitkernels import _native
from vitkernels.reference import window_attention as reference_2d
from vitkernels.reference.window_attention_3d import (
    effective_window_and_shift,
    monai_equivalent_table,
    monai_relative_position_index,
    padded_size_3d,
    relative_position_index_3d,
    shifted_window_mask_3d,
    window_attention_3d,
    window_partition_3d,
    window_reverse_3d,
)

from fused_ops_helpers import CPU_ISAS, use_cpu_isa  # noqa: E402


def native_window_attention_3d(qkv, table, window, shift, num_heads, scale, qkv_bias=None, *, pad_before_shift=True):
    """The fused CPU op (csrc/cpu/window_attention_3d.cpp) through the public op with the reference's signature."""
    if not _native.is_loaded():
        pytest.skip(_native.IMPORT_ERROR)
    return vitkernels.window_attention_3d(qkv, table, window, shift, num_heads, scale, qkv_bias, pad_before_shift,
                                          backend="native")


TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def triton_or_skip():
    from vitkernels.triton import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device(TRITON_DEV))
    if reason is not None:
        pytest.skip(reason)


def triton_window_attention_3d(qkv, table, window, shift, num_heads, scale, qkv_bias=None, *, pad_before_shift=True):
    """The Triton op (vitkernels/triton/window_attention_3d.py) through the public op with the reference's signature:
    fp32 on TRITON_DEV, results back on qkv's device in qkv's dtype (the kernels take fp32 / fp16 / bf16, not fp64)."""
    triton_or_skip()
    to = dict(device=TRITON_DEV, dtype=torch.float32)
    out = vitkernels.window_attention_3d(qkv.to(**to), table.to(**to), window, shift, num_heads, scale,
                                         None if qkv_bias is None else qkv_bias.to(**to), pad_before_shift,
                                         backend="triton")
    return out.to(qkv.device, qkv.dtype)


IMPLEMENTATIONS = {"reference": window_attention_3d, "native": native_window_attention_3d,
                   "triton": triton_window_attention_3d}

# (B, (D, H, W), window, shift, num_heads, head_dim, pad_before_shift)
CASES = [
    (2, (4, 6, 6), (2, 3, 3), (1, 1, 1), 2, 4, True),     # divisible, shift on every axis: 27 regions
    (1, (5, 7, 6), (2, 3, 4), (1, 1, 2), 2, 3, True),     # D, H, W all padded, shift: MONAI / Video Swin order
    (1, (5, 7, 6), (2, 3, 4), (1, 1, 2), 1, 5, False),    # the same, timm's order (roll, then pad)
    (2, (3, 8, 5), (3, 4, 4), (0, 2, 1), 3, 2, True),     # no shift along D (constant region), padding along W
    (1, (6, 4, 4), (4, 4, 4), (0, 0, 0), 2, 4, True),     # no shift: no mask, padding along D only
    (1, (7, 7, 7), (7, 7, 7), (3, 3, 3), 1, 4, True),     # MONAI's default window: N = 343 tokens
    (1, (1, 9, 10), (1, 4, 4), (0, 2, 2), 2, 3, False),   # a 2D map as D = 1
]


def case_id(c):
    return (f"B{c[0]}-{'x'.join(map(str, c[1]))}-w{''.join(map(str, c[2]))}-s{''.join(map(str, c[3]))}"
            f"-h{c[4]}x{c[5]}-{'padfirst' if c[6] else 'rollfirst'}")


CASE_IDS = [case_id(c) for c in CASES]

# Triton: head_dim 16 (the kernels' smallest), tiny volumes (the interpreter is slow), one 7x7x7 window
TRITON_CASES = [
    (2, (4, 6, 6), (2, 3, 3), (1, 1, 1), 2, 16, True),    # divisible, shift on every axis: 27 regions
    (1, (5, 7, 6), (2, 3, 4), (1, 1, 2), 2, 16, True),    # D, H, W all padded, shift: MONAI / Video Swin order
    (1, (5, 7, 6), (2, 3, 4), (1, 1, 2), 1, 16, False),   # the same, timm's order (roll, then pad)
    (2, (3, 8, 5), (3, 4, 4), (0, 2, 1), 1, 16, True),    # shift on two axes, padding along W
    (1, (5, 4, 6), (2, 2, 5), (1, 0, 0), 1, 16, False),   # shift along D only, padding along D and W
    (1, (6, 4, 4), (4, 4, 4), (0, 0, 0), 1, 16, True),    # no shift: no mask, padding along D only, N = 64
    (2, (1, 3, 3), (2, 2, 2), (1, 1, 1), 1, 16, True),    # window deeper than the volume: the shift wraps past D
    (1, (5, 4, 6), (4, 4, 5), (2, 0, 2), 1, 16, False),   # N = 80: the large-window kernels, padded, timm's order
    (1, (7, 7, 7), (7, 7, 7), (3, 3, 3), 1, 16, True),    # MONAI's default window: N = 343
    (1, (1, 9, 10), (1, 4, 4), (0, 2, 2), 2, 16, False),  # a 2D map as D = 1
]

# implementation -> (cases, input dtype, output tolerance, gradient tolerance (times the gradient's magnitude))
SETTINGS = {"triton": (TRITON_CASES, torch.float32, 2e-5, 1e-4)}
DEFAULT_SETTINGS = (CASES, torch.float64, 1e-10, 1e-9)
DENSE_PARAMS = [(impl, case) for impl in IMPLEMENTATIONS for case in SETTINGS.get(impl, DEFAULT_SETTINGS)[0]]


def monai_swin():
    try:
        return importlib.import_module("monai.networks.nets.swin_unetr")
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"monai not importable: {type(exc).__name__}: {exc}")


# --- the independent formulation: every token of the padded, shifted frame attends to every other, by coordinates ---

def _axis_source(length, padded, shift, pad_before_shift):
    """For each coordinate p of the padded, shifted frame along one axis: the source coordinate and whether it is a
    real token (else a padded one)."""
    p = torch.arange(padded)
    if pad_before_shift:
        src = (p + shift) % padded
        return src.clamp(max=length - 1), src < length
    src = torch.where(p < length, (p + shift) % length, torch.zeros_like(p))
    return src, p < length


def _axis_region(padded, window, shift):
    p = torch.arange(padded)
    if shift == 0:
        return torch.zeros_like(p)
    return (p >= padded - window).long() + (p >= padded - shift).long()


def dense_window_attention_3d(qkv, table, window, shift, num_heads, scale, qkv_bias=None, pad_before_shift=True,
                              index=None):
    """The op from token coordinates, without roll, pad, partition or slice-built masks: a dense (M, M) attention
    over the M = Dp*Hp*Wp positions of the padded, shifted frame, where a pair in different windows is excluded,
    a pair in one window gets ``table[relative index]`` plus -100 if their regions differ."""
    B, D, H, W, three_c = qkv.shape
    hd = three_c // (3 * num_heads)
    size = (D, H, W)
    padded = padded_size_3d(size, window)
    axes = [_axis_source(n, p, s, pad_before_shift) for n, p, s in zip(size, padded, shift)]
    grids = torch.meshgrid(*[torch.arange(p) for p in padded], indexing="ij")
    pos = torch.stack([g.reshape(-1) for g in grids], dim=1)  # M, 3: frame coordinates
    src = torch.stack([axes[a][0][pos[:, a]] for a in range(3)], dim=1)
    real = axes[0][1][pos[:, 0]] & axes[1][1][pos[:, 1]] & axes[2][1][pos[:, 2]]
    tokens = qkv[:, src[:, 0], src[:, 1], src[:, 2]]  # B, M, 3C
    pad_value = qkv_bias if qkv_bias is not None else qkv.new_zeros(three_c)
    tokens = torch.where(real[None, :, None], tokens, pad_value.to(qkv.dtype))
    q, k, v = tokens.view(B, -1, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    window_t = torch.tensor(window)
    win_id = pos // window_t
    same_window = (win_id[:, None, :] == win_id[None, :, :]).all(-1)
    inner = pos % window_t
    if index is None:
        rel = inner[:, None, :] - inner[None, :, :] + (window_t - 1)
        flat = (rel[..., 0] * (2 * window[1] - 1) + rel[..., 1]) * (2 * window[2] - 1) + rel[..., 2]
    else:  # an explicit (N, N) index over in-window token numbers
        token = (inner[:, 0] * window[1] + inner[:, 1]) * window[2] + inner[:, 2]
        flat = index[token[:, None], token[None, :]]
    bias = table[flat.clamp(min=0)].permute(2, 0, 1)  # nH, M, M (pairs across windows are excluded below)
    region = 9 * _axis_region(padded[0], window[0], shift[0])[pos[:, 0]] \
        + 3 * _axis_region(padded[1], window[1], shift[1])[pos[:, 1]] + _axis_region(padded[2], window[2], shift[2])[pos[:, 2]]
    mask = torch.where(region[:, None] == region[None, :], 0.0, -100.0).to(qkv.dtype)
    scores = (q * scale) @ k.transpose(-2, -1) + bias.to(qkv.dtype) + mask
    scores = scores.masked_fill(~same_window, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, num_heads * hd)  # B, M, C
    result = qkv.new_zeros(B, D, H, W, num_heads * hd)
    keep = real.nonzero().squeeze(1)
    return result.index_put((torch.arange(B)[:, None], src[keep, 0][None], src[keep, 1][None], src[keep, 2][None]),
                            out[:, keep])


def _case_inputs(case, dtype=torch.float64):
    B, size, window, shift, heads, hd, pad_first = case
    table_rows = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
    qkv = torch.randn(B, *size, 3 * heads * hd, dtype=dtype)
    table = torch.randn(table_rows, heads, dtype=dtype)
    qkv_bias = torch.randn(3 * heads * hd, dtype=dtype)
    return qkv, table, qkv_bias


@pytest.mark.parametrize("impl,case", DENSE_PARAMS, ids=[f"{i}-{case_id(c)}" for i, c in DENSE_PARAMS])
def test_window_attention_3d_matches_the_dense_formulation(impl, case):
    B, size, window, shift, heads, hd, pad_first = case
    _, dtype, out_tol, grad_tol = SETTINGS.get(impl, DEFAULT_SETTINGS)
    # inputs rounded to the implementation's dtype; the dense formulation computes from them in float64
    qkv, table, qkv_bias = (t.to(dtype).double() for t in _case_inputs(case))
    scale = hd ** -0.5
    inputs = [t.clone().requires_grad_() for t in (qkv, table, qkv_bias)]
    expected_inputs = [t.clone().requires_grad_() for t in (qkv, table, qkv_bias)]
    out = IMPLEMENTATIONS[impl](*inputs[:2], window, shift, heads, scale, inputs[2], pad_before_shift=pad_first)
    expected = dense_window_attention_3d(*expected_inputs[:2], window, shift, heads, scale, expected_inputs[2], pad_first)
    assert out.shape == (B, *size, heads * hd) and out.dtype == qkv.dtype
    torch.testing.assert_close(out, expected, rtol=out_tol, atol=out_tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for name, ours, theirs in zip(("qkv", "table", "qkv_bias"), inputs, expected_inputs):
        ours_grad = torch.zeros_like(ours) if ours.grad is None else ours.grad  # qkv_bias: unused without padding
        magnitude = max(1.0, theirs.grad.abs().max().item())
        torch.testing.assert_close(ours_grad, theirs.grad, rtol=grad_tol, atol=grad_tol * magnitude, msg=name)


def test_window_attention_3d_without_qkv_bias_pads_with_zeros():
    case = CASES[1]
    qkv, table, _ = _case_inputs(case)
    _, _, window, shift, heads, hd, pad_first = case
    out = window_attention_3d(qkv, table, window, shift, heads, hd ** -0.5, pad_before_shift=pad_first)
    expected = dense_window_attention_3d(qkv, table, window, shift, heads, hd ** -0.5, None, pad_first)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_pad_order_matters_only_with_padding_and_shift():
    case = CASES[1]
    qkv, table, qkv_bias = _case_inputs(case)
    _, _, window, shift, heads, hd, _ = case
    run = lambda qkv_, shift_, first: window_attention_3d(qkv_, table, window, shift_, heads, 0.5, qkv_bias,  # noqa: E731
                                                          pad_before_shift=first)
    assert not torch.allclose(run(qkv, shift, True), run(qkv, shift, False))
    torch.testing.assert_close(run(qkv, (0, 0, 0), True), run(qkv, (0, 0, 0), False), rtol=0, atol=0)
    divisible = qkv[:, :4, :6, :4]
    torch.testing.assert_close(run(divisible, shift, True), run(divisible, shift, False), rtol=0, atol=0)


def test_2d_op_is_the_depth_one_case():
    """The 2D reference (timm's order) is the 3D one with D = 1, wd = 1, pad_before_shift=False."""
    qkv = torch.randn(2, 9, 10, 3 * 2 * 3, dtype=torch.float64)
    table = torch.randn(7 * 7, 2, dtype=torch.float64)
    bias = torch.randn(18, dtype=torch.float64)
    expected = reference_2d.window_attention(qkv, table, (4, 4), (2, 1), 2, 0.4, bias)
    out = window_attention_3d(qkv[:, None], table, (1, 4, 4), (0, 2, 1), 2, 0.4, bias, pad_before_shift=False)
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(relative_position_index_3d((1, 4, 4)), reference_2d.relative_position_index(4, 4))


@pytest.mark.parametrize("first", [True, False])
def test_partition_and_reverse_are_inverse_and_adjoint(first):
    x = torch.randn(2, 5, 7, 6, 3, dtype=torch.float64)
    window, shift = (2, 3, 4), (1, 2, 3)
    windows = window_partition_3d(x, window, shift, first)
    assert windows.shape == (2 * 3 * 3 * 2, 24, 3)
    torch.testing.assert_close(window_reverse_3d(windows, (5, 7, 6), window, shift, first), x, rtol=0, atol=0)
    y = torch.randn_like(windows)  # <partition(x), y> == <x, reverse(y)> up to the cropped padding
    lhs = (windows * y).sum()
    rhs = (x * window_reverse_3d(y, (5, 7, 6), window, shift, first)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_mask_has_27_regions_and_matches_the_coordinate_rule():
    padded, window, shift = (6, 9, 12), (3, 3, 4), (1, 2, 2)
    mask = shifted_window_mask_3d(padded, window, shift, dtype=torch.float64)
    assert mask.shape == (2 * 3 * 3, 36, 36)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    regions = [_axis_region(p, w, s) for p, w, s in zip(padded, window, shift)]
    label = 9 * regions[0][:, None, None] + 3 * regions[1][None, :, None] + regions[2][None, None, :]
    assert label.unique().numel() == 27
    windows = window_partition_3d(label[None, ..., None].double(), window).squeeze(-1)
    expected = torch.where(windows[:, :, None] == windows[:, None, :], 0.0, -100.0).double()
    torch.testing.assert_close(mask, expected, rtol=0, atol=0)
    assert shifted_window_mask_3d(padded, window, (0, 0, 0)) is None


# --- MONAI: WindowAttention's index, compute_mask, get_window_size, SwinTransformerBlock.forward_part1 -------------

def test_index_and_mask_match_monai():
    monai = monai_swin()
    for window in [(2, 3, 4), (7, 7, 7), (3, 5)]:
        attn = monai.WindowAttention(12, 2, window)
        ours = relative_position_index_3d(window if len(window) == 3 else (1, *window))
        assert torch.equal(attn.relative_position_index, ours)
    for padded, window, shift in [((6, 9, 12), (3, 3, 4), (1, 2, 2)), ((4, 8, 8), (4, 4, 4), (0, 2, 2)),
                                  ((7, 7, 7), (7, 7, 7), (3, 3, 3))]:
        torch.testing.assert_close(shifted_window_mask_3d(padded, window, shift),
                                   monai.compute_mask(list(padded), window, shift, None), rtol=0, atol=0)
    for size in [(4, 9, 20), (7, 7, 3), (8, 8, 8)]:
        assert effective_window_and_shift(size, (7, 7, 7), (3, 3, 3)) == \
            monai.get_window_size(size, (7, 7, 7), (3, 3, 3))


BLOCK_CASES = [  # (spatial size, module window, module shift): 3D and 2D
    ((6, 10, 9), (4, 4, 4), (2, 2, 2)),   # padding on every axis, shift: pad-before-shift
    ((8, 8, 8), (4, 4, 4), (2, 2, 2)),    # divisible
    ((3, 9, 10), (4, 4, 4), (2, 2, 2)),   # D <= window: wd shrinks to 3, sd dropped (the standard index, sliced table)
    ((9, 3, 10), (4, 4, 4), (2, 2, 2)),   # H shrinks: MONAI's sliced-index quirk
    ((10, 11), (4, 4), (2, 2)),           # 2D, padding
    ((3, 11), (4, 4), (2, 2)),            # 2D, H shrinks (sliced table)
    ((11, 3), (4, 4), (2, 2)),            # 2D, W shrinks (quirk)
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[f"{'x'.join(map(str, c[0]))}" for c in BLOCK_CASES])
def test_reference_reproduces_monai_swin_block_attention(case):
    """MONAI ``SwinTransformerBlock.forward_part1`` (norm, pad, shift, WindowAttention with its mask, reverse, crop)
    == norm1 -> qkv Linear -> window_attention_3d (MONAI's order and index) -> proj, forward and backward."""
    monai = monai_swin()
    size, window, shift = case
    dims = len(size)
    block = monai.SwinTransformerBlock(12, 3, window, shift, qkv_bias=True).double()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    use_window, use_shift = effective_window_and_shift(size, window, shift)
    assert (use_window, use_shift) == monai.get_window_size(size, window, shift)
    padded = padded_size_3d(size if dims == 3 else (1, *size), use_window if dims == 3 else (1, *use_window))
    mask = monai.compute_mask(list(padded[3 - dims:]), use_window, use_shift, None) if any(use_shift) else None
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs = block.forward_part1(x_theirs, mask)

    attn = block.attn
    xin = x_ours if dims == 3 else x_ours[:, None]
    window3 = use_window if dims == 3 else (1, *use_window)
    shift3 = use_shift if dims == 3 else (0, *use_shift)
    index = monai_relative_position_index(window, use_window)
    table = attn.relative_position_bias_table
    qkv = attn.qkv(block.norm1(xin))
    out = window_attention_3d(qkv, table, window3, shift3, attn.num_heads, attn.scale, attn.qkv.bias,
                              relative_position_index=index)
    ours = attn.proj(out)
    ours = ours if dims == 3 else ours[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)

    # where MONAI's sliced index is a standard index into a slice of the table, the sliced table gives the same
    sliced = monai_equivalent_table(table, window, use_window)
    quirk = use_window[1:] != tuple(window)[1:]
    assert (sliced is None) == quirk
    if sliced is not None:
        standard = window_attention_3d(qkv, sliced, window3, shift3, attn.num_heads, attn.scale, attn.qkv.bias)
        torch.testing.assert_close(standard, out, rtol=1e-12, atol=1e-12)

    grad = torch.randn_like(theirs)
    theirs.backward(grad, inputs=[x_theirs, *block.parameters()])
    theirs_grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad()
    ours.backward(grad, inputs=[x_ours, *block.parameters()])
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-9, atol=1e-9)
    for name, p in block.named_parameters():
        if name in theirs_grads:
            torch.testing.assert_close(p.grad, theirs_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_shift_must_be_smaller_than_the_window():
    qkv = torch.randn(1, 4, 4, 4, 6)
    with pytest.raises(ValueError, match="shift_size"):
        window_attention_3d(qkv, torch.randn(7 * 7 * 7, 1), (4, 4, 4), (4, 0, 0), 1, 0.5)


# --- the native op: every ISA, gradcheck, low precision, opcheck, torch.compile, refusals -------------------------

def native_or_skip():
    if not _native.is_loaded():
        pytest.skip(_native.IMPORT_ERROR)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=[CASE_IDS[0], CASE_IDS[2], CASE_IDS[5]])
def test_native_every_isa_matches_the_dense_formulation(case, isa, monkeypatch):
    native_or_skip()
    use_cpu_isa(monkeypatch, isa)
    B, size, window, shift, heads, hd, pad_first = case
    qkv, table, qkv_bias = _case_inputs(case)
    out = native_window_attention_3d(qkv, table, window, shift, heads, hd ** -0.5, qkv_bias, pad_before_shift=pad_first)
    expected = dense_window_attention_3d(qkv, table, window, shift, heads, hd ** -0.5, qkv_bias, pad_first)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


GRADCHECK_CASES = [  # tiny: (B, (D, H, W), window, shift, heads, head_dim, pad_before_shift)
    (1, (3, 3, 2), (2, 2, 2), (1, 1, 1), 2, 2, True),
    (1, (3, 2, 3), (2, 2, 2), (1, 0, 1), 1, 3, False),
    (2, (1, 3, 3), (2, 2, 2), (1, 1, 1), 1, 2, True),  # window deeper than the volume: the shift wraps past D
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=["padfirst", "rollfirst", "shift-past-depth"])
def test_native_gradcheck_float64(case, isa, monkeypatch):
    native_or_skip()
    use_cpu_isa(monkeypatch, isa)
    B, size, window, shift, heads, hd, pad_first = case
    inputs = tuple(t.requires_grad_() for t in _case_inputs(case))
    assert torch.autograd.gradcheck(
        lambda q, t, b: vitkernels.window_attention_3d(q, t, window, shift, heads, 0.7, b, pad_first, backend="native"),
        inputs,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[CASE_IDS[1], CASE_IDS[3], CASE_IDS[5]])
def test_native_low_precision_matches_the_reference(case, dtype):
    """fp32 / bf16 / fp16 inputs (fp32 compute) against the reference in fp64 (fp32 for the half types), forward and
    the gradients of qkv, table and qkv_bias."""
    native_or_skip()
    B, size, window, shift, heads, hd, pad_first = case
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    tensors = [t.to(dtype) for t in _case_inputs(case, torch.float32)]
    ours = [t.clone().requires_grad_() for t in tensors]
    theirs = [t.to(ref_dtype).requires_grad_() for t in tensors]
    out = vitkernels.window_attention_3d(*ours[:2], window, shift, heads, None, ours[2], pad_first, backend="native")
    expected = window_attention_3d(*theirs[:2], window, shift, heads, hd ** -0.5, theirs[2], pad_before_shift=pad_first)
    assert out.dtype == dtype
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.to(ref_dtype), expected, rtol=tol, atol=tol)
    grad = torch.randn_like(expected).to(dtype)
    out.backward(grad)
    expected.backward(grad.to(ref_dtype))
    for name, a, b in zip(("qkv", "table", "qkv_bias"), ours, theirs):
        want = torch.zeros_like(b) if b.grad is None else b.grad  # qkv_bias: unused without padding
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(a.grad.to(ref_dtype), want, rtol=tol, atol=tol * scale, msg=name)


def test_native_opcheck():
    native_or_skip()
    qkv = torch.randn(1, 3, 5, 4, 24, requires_grad=True)
    table = torch.randn(3 * 5 * 5, 2, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    for b in (bias, None):
        for pad_first in (True, False):
            torch.library.opcheck(torch.ops.vitkernels.window_attention_3d.default,
                                  (qkv, table, b, [2, 3, 3], [1, 2, 1], 2, 0.25, pad_first))


def test_native_compiles_fullgraph():
    native_or_skip()
    qkv = torch.randn(2, 4, 5, 6, 18, requires_grad=True)
    table = torch.randn(3 * 5 * 5, 3, requires_grad=True)
    bias = torch.randn(18)

    def f(q, t):
        return vitkernels.window_attention_3d(q, t, (2, 3, 3), (1, 1, 2), 3, None, bias, backend="native")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, expected = compiled(qkv, table), f(qkv, table)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(out.sum(), (qkv, table))
    expected_grads = torch.autograd.grad(expected.sum(), (qkv, table))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_native_refuses_double_backward():
    native_or_skip()
    qkv = torch.randn(1, 2, 3, 3, 6, dtype=torch.float64, requires_grad=True)
    table = torch.randn(3 * 5 * 5, 1, dtype=torch.float64)
    out = vitkernels.window_attention_3d(qkv, table, (2, 3, 3), (1, 1, 1), 1, backend="native")
    (grad,) = torch.autograd.grad(out.pow(2).sum(), qkv, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


def test_native_softmax_state_is_not_differentiable():
    """The op's row log-sum-exp is the backward's input, not a differentiable result: it does not require grad (no
    zero gradient is allocated for it on every backward); the output does."""
    native_or_skip()
    qkv = torch.randn(1, 3, 4, 4, 6, requires_grad=True)  # padded to whole windows: qkv_bias is the padding's qkv
    table = torch.randn(3 * 5 * 5, 1, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    out, lse = torch.ops.vitkernels.window_attention_3d(qkv, table, bias, [2, 3, 3], [0, 0, 0], 1, 0.5, True)
    assert out.requires_grad and not lse.requires_grad
    grads = torch.autograd.grad(out.pow(2).sum(), (qkv, table, bias))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_native_is_the_cpu_default_and_says_why_not_elsewhere():
    native_or_skip()
    from vitkernels.ops.window_attention_3d import op

    call = vitkernels.dispatch.Call(torch.device("cpu"), torch.float32, {"head_dim": 16, "tokens_per_window": 343})
    assert op.auto_choice(call)[0] == "native"
    choice, reasons = op.auto_choice(vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, {}))
    # a GPU takes the Triton kernels first (where Triton can run there), then the CUDA kernel, then the reference
    expected = "triton" if reasons["triton"] is None else "native" if reasons["native"] is None else "reference"
    assert choice == expected
    if not _native.has_kernel("window_attention_3d", "CUDA"):  # the extension was built without CUDA
        assert "without CUDA kernels" in reasons["native"]
        return
    # with the CUDA kernel (csrc/cuda/window_attention_3d.cpp): windows of at most 512 tokens, head_dim <= 128
    for details, why in (({"head_dim": 32, "tokens_per_window": 8 * 8 * 9}, "at most 512 tokens"),
                         ({"head_dim": 160, "tokens_per_window": 343}, "head_dim <= 128")):
        reasons = op.auto_choice(vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, details))[1]
        assert why in reasons["native"]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(qkv=torch.randn(1, 4, 4, 12)), ValueError, "qkv must have 5 dimensions"),
        (dict(window_size=(2, 2)), TypeError, "window_size must be an int or a triple"),
        (dict(window_size=(2, 0, 2)), ValueError, "window_size must be positive"),
        (dict(shift_size=(0, 2, 0)), ValueError, "shift_size must be smaller"),
        (dict(shift_size=(0, -1, 0)), ValueError, "shift_size must be >= 0"),
        (dict(num_heads=5), ValueError, "3 \\* num_heads \\* head_dim"),
        (dict(table=torch.randn(26, 2)), ValueError, "relative_position_bias_table must have shape"),
        (dict(qkv_bias=torch.randn(11)), ValueError, "qkv_bias must have shape"),
        (dict(qkv=torch.randn(1, 0, 4, 4, 12)), ValueError, "non-empty"),
        (dict(qkv=torch.randn(1, 4, 4, 4, 12, dtype=torch.float64).to(torch.int32)), TypeError, "qkv must have dtype"),
        (dict(pad_before_shift=1), TypeError, "pad_before_shift must be a bool"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_bad_arguments_are_refused_by_name(kwargs, error, match, backend):
    if backend == "native":
        native_or_skip()
    args = dict(qkv=torch.randn(1, 4, 4, 4, 12), table=torch.randn(27, 2), window_size=(2, 2, 2),
                shift_size=(1, 1, 1), num_heads=2, qkv_bias=None, pad_before_shift=True)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        vitkernels.window_attention_3d(args["qkv"], args["table"], args["window_size"], args["shift_size"],
                                       args["num_heads"], None, args["qkv_bias"], args["pad_before_shift"],
                                       backend=backend)


# --- the Triton op: no qkv bias, empty batch, half precision, opcheck, torch.compile, refusals -----------------------

def test_triton_without_qkv_bias_pads_with_zeros():
    case = TRITON_CASES[1]
    _, _, window, shift, heads, hd, pad_first = case
    qkv, table, _ = (t.float().double() for t in _case_inputs(case, torch.float32))
    ours = [t.clone().requires_grad_() for t in (qkv, table)]
    theirs = [t.clone().requires_grad_() for t in (qkv, table)]
    out = triton_window_attention_3d(*ours, window, shift, heads, 0.3, None, pad_before_shift=pad_first)
    expected = dense_window_attention_3d(*theirs, window, shift, heads, 0.3, None, pad_first)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for name, a, b in zip(("qkv", "table"), ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * max(1.0, b.grad.abs().max().item()),
                                   msg=name)


def test_triton_empty_batch():
    triton_or_skip()
    qkv = torch.randn(0, 3, 4, 4, 48, device=TRITON_DEV, requires_grad=True)
    table = torch.randn(27, 1, device=TRITON_DEV, requires_grad=True)
    bias = torch.randn(48, device=TRITON_DEV, requires_grad=True)
    out = vitkernels.window_attention_3d(qkv, table, (2, 2, 2), (1, 1, 1), 1, None, bias, backend="triton")
    assert out.shape == (0, 3, 4, 4, 16)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape
    assert torch.equal(table.grad, torch.zeros_like(table)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_matches_the_reference(dtype):
    """fp16 / bf16 inputs (fp32 compute) against the reference in fp32 on the same rounded inputs, forward and the
    gradients of qkv, table and qkv_bias (the native low-precision test's tolerances)."""
    triton_or_skip()
    case = TRITON_CASES[1]
    _, _, window, shift, heads, hd, pad_first = case
    tensors = [t.to(dtype) for t in _case_inputs(case, torch.float32)]
    ours = [t.to(TRITON_DEV).clone().requires_grad_() for t in tensors]
    theirs = [t.float().requires_grad_() for t in tensors]
    out = vitkernels.window_attention_3d(*ours[:2], window, shift, heads, None, ours[2], pad_first, backend="triton")
    expected = window_attention_3d(*theirs[:2], window, shift, heads, hd ** -0.5, theirs[2], pad_before_shift=pad_first)
    assert out.dtype == dtype
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.cpu().float(), expected, rtol=tol, atol=tol)
    grad = torch.randn_like(expected).to(dtype)
    out.backward(grad.to(TRITON_DEV))
    expected.backward(grad.float())
    for name, a, b in zip(("qkv", "table", "qkv_bias"), ours, theirs):
        scale = max(1.0, b.grad.abs().max().item())
        torch.testing.assert_close(a.grad.cpu().float(), b.grad, rtol=tol, atol=tol * scale, msg=name)


def test_triton_opcheck():
    """Forward and backward custom ops (on a GPU: the triton_op / wrap_triton path torch.compile traces)."""
    triton_or_skip()
    # one head, one window of 2 x 3 x 3 (padded along W, shifted along every axis): the op's checks run it a dozen
    # times under the interpreter, each program op by op, so the volume is kept small (8 windows x 2 heads: ~13 s a
    # case; 4 windows x 1 head: ~8 s)
    qkv = torch.randn(1, 2, 3, 2, 48, device=TRITON_DEV, requires_grad=True)
    table = torch.randn(3 * 5 * 5, 1, device=TRITON_DEV, requires_grad=True)
    bias = torch.randn(48, device=TRITON_DEV, requires_grad=True)
    # the schema / fake / autograd checks: each qkv-bias case with one padding order; the numbers of both orders,
    # with the bias, are test_window_attention_3d_matches_the_dense_*'s
    for b, first in ((bias, True), (None, False)):
        args = (qkv, table, b, [2, 3, 3], [1, 2, 1], 1, 0.25, first)
        torch.library.opcheck(torch.ops.vitkernels.triton_window_attention_3d.default, args)
        with torch.no_grad():
            out, lse = torch.ops.vitkernels.triton_window_attention_3d(*args)
        grad = torch.randn_like(out)
        detached = (qkv.detach(), table.detach(), b.detach() if b is not None else None)
        torch.library.opcheck(torch.ops.vitkernels.triton_window_attention_3d_backward.default,
                              (grad, *detached, out, lse, [2, 3, 3], [1, 2, 1], 1, 0.25, first))
        # inference: no log-sum-exp computed or stored (an empty tensor), the fake agrees
        plain = (*detached, [2, 3, 3], [1, 2, 1], 1, 0.25, first, False)
        torch.library.opcheck(torch.ops.vitkernels.triton_window_attention_3d.default, plain)
        out_inf, lse_inf = torch.ops.vitkernels.triton_window_attention_3d(*plain)
        assert lse_inf.numel() == 0 and torch.equal(out_inf, out)


def test_triton_compiles_fullgraph():
    """fullgraph compile, forward and backward: inductor on a GPU, aot_eager under the interpreter."""
    triton_or_skip()
    torch._dynamo.reset()
    qkv = torch.randn(2, 4, 5, 6, 48, device=TRITON_DEV, requires_grad=True)
    table = torch.randn(3 * 5 * 5, 1, device=TRITON_DEV, requires_grad=True)
    bias = torch.randn(48, device=TRITON_DEV)

    def f(q, t):
        return vitkernels.window_attention_3d(q, t, (2, 3, 3), (1, 1, 2), 1, None, bias, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if TRITON_DEV == "cuda" else "aot_eager")
    out, expected = compiled(qkv, table), f(qkv, table)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out.sum(), (qkv, table))
    expected_grads = torch.autograd.grad(expected.sum(), (qkv, table))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_triton_refuses_double_backward():
    triton_or_skip()
    qkv = torch.randn(1, 2, 3, 3, 48, device=TRITON_DEV, requires_grad=True)
    table = torch.randn(3 * 5 * 5, 1, device=TRITON_DEV)
    out = vitkernels.window_attention_3d(qkv, table, (2, 3, 3), (1, 1, 1), 1, backend="triton")
    (grad,) = torch.autograd.grad(out.pow(2).sum(), qkv, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


def test_triton_unsupported_configurations_fall_back_with_reasons():
    """What the kernels do not take is refused with a reason (auto then falls back): head_dim not a power of two in
    [16, 128] (MONAI's feature_size 24 has head_dim 8), windows of more than 512 tokens, float64."""
    from vitkernels.ops.window_attention_3d import op
    from vitkernels.triton import HAS_TRITON

    call = vitkernels.dispatch.Call(torch.device("cuda"), torch.float32, {"head_dim": 8, "tokens_per_window": 343})
    reason = op.reasons(call)["triton"]
    assert reason is not None and ("head_dim 8" in reason or "triton" in reason.lower())
    if HAS_TRITON:
        from vitkernels.triton import window_attention_3d as kernels
        from vitkernels.triton._launch import SM80, SM90

        assert "head_dim 8" in kernels.supported_reason(8, 343, torch.float32)
        assert "576 tokens" in kernels.supported_reason(16, 576, torch.float32)
        assert "float64" in kernels.supported_reason(16, 343, torch.float64)
        for target in (SM80, SM90):  # the headline problems the compile gate compiles
            for hd, n in ((16, 343), (32, 343), (32, 392)):
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    assert kernels.supported_reason(hd, n, dtype, target) is None
