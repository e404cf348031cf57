"""window_attention_v2: the reference op vs timm's V2 block attention, gradients, argument errors; the fast backends
(native CPU, Triton under the interpreter) vs the float64 reference."""
import math

import pytest
import torch

import vitkernels
from vitkernels.reference import window_attention_v2 as reference

from helpers import import_timm

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


def test_reference_op_plus_timm_linears_equals_timm_block_attention():
    """The op between timm's qkv Linear (with cat(q_bias, 0, v_bias)) and proj is timm's whole _attn, for shifted,
    padded and non-square cases."""
    import_timm()
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    for res, window, shift in [((14, 14), 7, 3), ((9, 10), 7, 3), ((10, 13), (3, 4), (1, 2))]:
        block = SwinTransformerV2Block(24, res, 3, window_size=window, shift_size=shift).double()
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


def test_relative_coords_table_matches_timm():
    import_timm()
    from timm.models.swin_transformer_v2 import WindowAttention

    for window, pretrained in [((8, 8), (0, 0)), ((3, 5), (0, 0)), ((16, 16), (12, 12)), ((1, 4), (0, 0))]:
        theirs = WindowAttention(8, window, 2, pretrained_window_size=pretrained)
        ours = reference.relative_coords_table(window, pretrained)
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
