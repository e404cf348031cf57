"""Swin V2: the window attention op (qkv in original order -> output, scaled cosine attention with the continuous
position bias) and the whole block, every peer side by side.

Op peers: ``reference eager`` (roll + pad + partition, F.normalize, materialised bias and mask, matmul-softmax-matmul,
reverse: timm's eager arithmetic), ``reference torch.compile``, ``sdpa`` (the same copies around
``scaled_dot_product_attention`` with the per-head scale folded into the normalised q and the bias + mask
materialised as its float mask), ``flex_attention`` (windows partitioned, q and k normalised, scale, bias and mask as
a ``score_mod`` by index math, compiled), and the vitkernels backends. The bias table (``16 * sigmoid`` of the cpb
MLP) and the scale are inputs of every peer (the MLP is the same small PyTorch computation around all of them). The
bandwidth floor is qkv read once plus the output written once (forward), plus grad_out read, qkv read again and
grad_qkv written (backward).

Block peers: ``timm eager`` (timm ``SwinTransformerV2Block``; timm's V2 attention has no SDPA path),
``timm torch.compile``, ``reference eager`` / ``reference torch.compile`` (vitkernels.reference, timm's arithmetic),
and ``vitkernels.SwinV2Block`` on each backend; modes ``inference`` (eval, no_grad) and ``fwd+bwd``.

Shapes: swinv2_tiny_window8_256 stage 1 (64x64, C 96, 3 heads) and stage 3 (16x16, C 384, 12 heads), window 8,
shift 4, and swinv2_base_window16_256 stage 1 (64x64, C 128, 4 heads, window 16, shift 8); batch 128 / 32 on a GPU
(bf16); on CPU (fp32, 2 cores) the op at batch 1 and the block at batch 4 (inference) / 2 (fwd+bwd), stage 1 only.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.reference import swin_v2 as reference_modules
from vitkernels.reference import window_attention as v1_reference
from vitkernels.reference import window_attention_v2 as reference
from vitkernels.reference.window_partition import padded_size, window_partition, window_reverse

from conftest import DEVICE, compiled_or_skip, padded_for_flex, run_benchmark, timm_or_skip

ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# (name, B, H, W, C, heads, window, shift)
if ON_GPU:
    OP_SHAPES = [
        ("swinv2-t stage1 64x64 C96 h3 ws8", 128, 64, 64, 96, 3, 8, 4),
        ("swinv2-t stage3 16x16 C384 h12 ws8", 128, 16, 16, 384, 12, 8, 4),
        ("swinv2-b stage1 64x64 C128 h4 ws16", 32, 64, 64, 128, 4, 16, 8),
    ]
else:
    OP_SHAPES = [("swinv2-t stage1 64x64 C96 h3 ws8", 1, 64, 64, 96, 3, 8, 4)]
MODES = ["fwd", "fwd+bwd"]


def _op_inputs(shape, requires_grad):
    _, B, H, W, C, heads, ws, shift = shape
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H, W, 3 * C, generator=gen).to(device=DEVICE, dtype=DTYPE)
    table = (16 * torch.rand((2 * ws - 1) ** 2, heads, generator=gen)).to(DEVICE)
    scale = torch.exp(torch.rand(heads, generator=gen) * 4.6).to(DEVICE)
    bias = torch.randn(3 * C, generator=gen).to(DEVICE)
    bias[C:2 * C] = 0  # timm's k_bias
    for t in (qkv, table, scale):
        t.requires_grad_(requires_grad)
    return qkv, table, scale, bias


def _reference(qkv, table, scale, bias, ws, shift, heads):
    return reference.window_attention_v2(qkv, table, scale, (ws, ws), (shift, shift), heads, bias)


def _windows_qkv(qkv, bias, ws, shift, heads):
    """Partitioned, normalised q, k and v (B_, heads, N, hd) as timm forms them, and the geometry."""
    windows = reference.qkv_windows(qkv, (ws, ws), (shift, shift), bias)
    B_, N, _ = windows.shape
    q, k, v = windows.reshape(B_, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v


def _sdpa(qkv, table, scale, bias, ws, shift, heads):
    """SDPA on the partitioned windows: scale folded into q^, bias + mask materialised as the float mask."""
    B, H, W, _ = qkv.shape
    q, k, v = _windows_qkv(qkv, bias, ws, shift, heads)
    B_, _, N, _ = q.shape
    q = q * scale.to(q.dtype).view(1, heads, 1, 1)
    index = v1_reference.relative_position_index(ws, ws, device=qkv.device)
    attn_mask = v1_reference.relative_position_bias(table, index).unsqueeze(0).to(qkv.dtype)
    Hp, Wp = padded_size(H, W, (ws, ws))
    mask = v1_reference.shifted_window_mask(Hp, Wp, (ws, ws), (shift, shift), device=qkv.device, dtype=qkv.dtype)
    if mask is not None:
        nw = mask.shape[0]
        mask = mask.view(1, nw, 1, N, N).expand(B_ // nw, -1, heads, -1, -1).reshape(-1, heads, N, N)
        attn_mask = attn_mask + mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
    return window_reverse(out.transpose(1, 2).reshape(B_, N, -1), H, W, (ws, ws), (shift, shift))


def _flex(ws, shift, heads, H, W):
    """flex_attention on partitioned, normalised windows; scale, bias and shifted-window mask in ``score_mod``."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"flex_attention unavailable: {exc}")
    flex = compiled_or_skip(flex_attention)
    Hp, Wp = padded_size(H, W, (ws, ws))
    n_windows = (Hp // ws) * (Wp // ws)
    mask = v1_reference.shifted_window_mask(Hp, Wp, (ws, ws), (shift, shift), device=DEVICE, dtype=torch.float32)
    mask = None if mask is None else padded_for_flex(mask, (1, 2))  # see padded_for_flex
    index = padded_for_flex(v1_reference.relative_position_index(ws, ws, device=DEVICE), (0, 1))

    def attend(qkv, table, scale, bias):
        B, H_, W_, _ = qkv.shape
        q, k, v = _windows_qkv(qkv, bias, ws, shift, heads)
        B_, _, N, _ = q.shape
        table_f, scale_f = table.float(), scale.float()

        def score_mod(score, b, h, q_idx, kv_idx):
            s = score * scale_f[h] + table_f[index[q_idx, kv_idx], h]
            if mask is not None:
                s = s + mask[b % n_windows, q_idx, kv_idx]
            return s

        out = flex(q, k, v, score_mod=score_mod, scale=1.0)
        return window_reverse(out.transpose(1, 2).reshape(B_, N, -1), H_, W_, (ws, ws), (shift, shift))

    return attend


OP_PEERS = ["reference eager", "reference torch.compile", "sdpa", "flex_attention", "vitkernels auto",
            "vitkernels triton", "vitkernels native"]


def _make_op(peer, shape):
    _, B, H, W, C, heads, ws, shift = shape
    if peer == "reference eager":
        return lambda q, t, s, b: _reference(q, t, s, b, ws, shift, heads)
    if peer == "reference torch.compile":
        compiled = compiled_or_skip(_reference, dynamic=False)
        return lambda q, t, s, b: compiled(q, t, s, b, ws, shift, heads)
    if peer == "sdpa":
        return lambda q, t, s, b: _sdpa(q, t, s, b, ws, shift, heads)
    if peer == "flex_attention":
        return _flex(ws, shift, heads, H, W)
    backend = peer.split()[1]
    if backend == "triton" and not ON_GPU:
        pytest.skip("triton on CPU is the Triton interpreter, a correctness tool: not benchmarked")
    backend = None if backend == "auto" else backend
    return lambda q, t, s, b: vitkernels.window_attention_v2(q, t, s, ws, shift, heads, qkv_bias=b, backend=backend)


@pytest.mark.parametrize("peer", OP_PEERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", OP_SHAPES, ids=[s[0] for s in OP_SHAPES])
def test_window_attention_v2(benchmark, shape, mode, peer):
    name, B, H, W, C, heads, ws, shift = shape
    benchmark.group = f"window_attention_v2 {mode} | {name} b{B}"
    benchmark.extra_info["peer"] = peer
    fn = _make_op(peer, shape)
    qkv, table, scale, bias = _op_inputs(shape, requires_grad=mode == "fwd+bwd")
    try:
        out = fn(qkv, table, scale, bias)
    except vitkernels.BackendUnavailableError as exc:
        pytest.skip(str(exc).splitlines()[0])
    except Exception as exc:
        if peer == "flex_attention" and mode == "fwd+bwd" and not ON_GPU:
            pytest.skip(f"flex_attention backward does not run on CPU: {type(exc).__name__}")
        raise
    with torch.no_grad():  # every peer computes the same thing before it is timed
        expected = _reference(qkv.float(), table, scale, bias, ws, shift, heads)
        torch.testing.assert_close(out.float(), expected, rtol=5e-2 if ON_GPU else 1e-3, atol=5e-2 if ON_GPU else 1e-3)
    elem = qkv.element_size()
    floor = B * H * W * 4 * C * elem  # qkv read once + output written once
    n_windows = B * -(-H // ws) * -(-W // ws)
    flops = 4 * n_windows * heads * (ws * ws) ** 2 * (C // heads)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(qkv, table, scale, bias)
    else:
        grad = torch.randn_like(out)

        def run():
            qkv.grad = table.grad = scale.grad = None
            fn(qkv, table, scale, bias).backward(grad)
        floor = floor * 11 // 4  # + grad_out read, qkv read again, grad_qkv written
        flops = flops * 7 // 2  # two matmuls forward, five backward (the scores recomputed)
    run_benchmark(benchmark, run, peer=peer, bytes_moved=floor, flops=flops)


# --- the whole block ------------------------------------------------------------------------------------------------

STAGES = {  # name: (size, dim, heads, window)
    "swinv2-t stage1 64x64 C96 h3 ws8": (64, 96, 3, 8),
    "swinv2-t stage3 16x16 C384 h12 ws8": (16, 384, 12, 8),
    "swinv2-b stage1 64x64 C128 h4 ws16": (64, 128, 4, 16),
}
BLOCK_CASES = []  # (stage, mode, batch)
for _stage in STAGES:
    if ON_GPU:
        _batch = 32 if "ws16" in _stage else 128
        BLOCK_CASES += [(_stage, "inference", _batch), (_stage, "fwd+bwd", _batch)]
    elif _stage.startswith("swinv2-t stage1"):
        BLOCK_CASES += [(_stage, "inference", 4), (_stage, "fwd+bwd", 2)]
BLOCK_PEERS = ["timm eager", "timm torch.compile", "reference eager", "reference torch.compile", "vitkernels auto",
               "vitkernels triton", "vitkernels native"]


def _block_kwargs(size, dim, heads, ws):
    return dict(dim=dim, input_resolution=(size, size), num_heads=heads, window_size=ws, shift_size=ws // 2)


def _make_block(peer, kwargs, weights):
    if peer.startswith("timm"):
        timm_or_skip()
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block

        block = SwinTransformerV2Block(**kwargs)
    elif peer.startswith("reference"):
        block = reference_modules.SwinTransformerV2Block(**kwargs)
    else:
        backend = peer.split()[1]
        if backend == "triton" and not ON_GPU:
            pytest.skip("triton on CPU is the Triton interpreter, a correctness tool: not benchmarked")
        block = vitkernels.SwinV2Block(**kwargs, backend=None if backend == "auto" else backend)
    block.load_state_dict(weights)
    return block.to(device=DEVICE, dtype=DTYPE)


def _weights(kwargs):
    """A reference block's state dict with non-trivial post-norms and q / v biases (timm zeroes them at init)."""
    torch.manual_seed(0)
    block = reference_modules.SwinTransformerV2Block(**kwargs)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("bias") or (name.startswith("norm") and name.endswith("weight")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.05)
    return block.state_dict()


@pytest.mark.parametrize("peer", BLOCK_PEERS)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=[f"{c[0]}-{c[1]}-b{c[2]}" for c in BLOCK_CASES])
def test_swin_v2_block(benchmark, case, peer):
    stage, mode, batch = case
    size, dim, heads, ws = STAGES[stage]
    benchmark.group = f"swin_v2_block {mode} | {stage} b{batch}"
    benchmark.extra_info["peer"] = peer
    kwargs = _block_kwargs(size, dim, heads, ws)
    if not ON_GPU and peer.endswith("torch.compile") and mode == "fwd+bwd":
        pytest.skip("not run on CPU: compiling the block's backward takes minutes on 2 cores, beyond the CPU "
                    "suite's budget (measured on GPU)")
    weights = _weights(kwargs)
    block = _make_block(peer, kwargs, copy.deepcopy(weights))
    block.train(mode == "fwd+bwd")
    fn = compiled_or_skip(block, dynamic=False) if peer.endswith("torch.compile") else block
    x = torch.randn(batch, size, size, dim, device=DEVICE, dtype=DTYPE)
    try:
        with torch.no_grad():
            out = fn(x[:1])
    except vitkernels.BackendUnavailableError as exc:
        pytest.skip(str(exc).splitlines()[0])
    with torch.no_grad():  # same numbers as the reference block before timing
        ref = _make_block("reference eager", kwargs, copy.deepcopy(weights)).float().eval()
        tol = 5e-2 if ON_GPU else 1e-3
        torch.testing.assert_close(out.float(), ref(x[:1].float()), rtol=tol, atol=tol)
    bytes_moved = 2 * x.numel() * x.element_size()  # the block's input read, output written (a lower bound)
    if mode == "inference":
        def run():
            with torch.no_grad():
                return fn(x)
    else:
        xg = x.clone().requires_grad_()
        grad = torch.randn_like(x)

        def run():
            xg.grad = None
            fn(xg).backward(grad)
        bytes_moved *= 2
    run_benchmark(benchmark, run, peer=peer, bytes_moved=bytes_moved)
