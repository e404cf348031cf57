"""window_attention: the reference op vs an independent per-token coordinate formulation, vs timm's block,
gradients, and argument errors. Fast backends add their own cases to this file's parametrisation as they land."""
import pytest
import torch

import vitkernels
from vitkernels.reference import window_attention as reference

from helpers import import_timm

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
