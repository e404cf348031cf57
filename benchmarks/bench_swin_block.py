"""Whole Swin block (LN, shifted-window attention with its Linears, MLP, residuals) vs timm, every peer side by side.

Peers: ``timm eager`` (timm ``SwinTransformerBlock``, its default non-fused attention), ``timm sdpa`` (the same block
with ``attn.fused_attn = True``: scaled_dot_product_attention with the bias + mask as a materialised float mask),
``timm torch.compile``, ``reference eager`` / ``reference torch.compile`` (vitkernels.reference, timm's arithmetic),
and ``vitkernels.SwinBlock`` on each backend. Modes: ``inference`` (eval, no_grad) and ``fwd+bwd`` (a training
step's forward and backward, parameters' gradients included).

Shapes: Swin-T stage 1 (56x56, C 96, 3 heads) and stage 3 (14x14, C 384, 12 heads), window 7, shift 3; batch 128 on
a GPU (bf16); on CPU (fp32, 2 cores) batch 8 for inference -- the native-backend target shape -- and batch 2 for
fwd+bwd.
"""
import copy

import pytest
import torch

import vitkernels
from vitkernels.reference import swin as reference

from conftest import DEVICE, compiled_or_skip, run_benchmark, timm_or_skip

ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
STAGES = {
    "swin-t stage1 56x56 C96 h3": (56, 96, 3),
    "swin-t stage3 14x14 C384 h12": (14, 384, 12),
}
CASES = []  # (stage, mode, batch)
for stage in STAGES:
    CASES.append((stage, "inference", 128 if ON_GPU else 8))
    if ON_GPU or stage.startswith("swin-t stage1"):
        CASES.append((stage, "fwd+bwd", 128 if ON_GPU else 2))
PEERS = ["timm eager", "timm sdpa", "timm torch.compile", "reference eager", "reference torch.compile",
         "vitkernels auto", "vitkernels triton", "vitkernels native"]


def _timm_block(size, dim, heads):
    timm_or_skip()
    from timm.models.swin_transformer import SwinTransformerBlock

    return SwinTransformerBlock(dim, (size, size), heads, window_size=7, shift_size=3)


def _make_block(peer, size, dim, heads, weights):
    if peer.startswith("timm"):
        block = _timm_block(size, dim, heads)
        if peer == "timm sdpa":
            block.attn.fused_attn = True
    elif peer.startswith("reference"):
        block = reference.SwinTransformerBlock(dim, (size, size), heads, window_size=7, shift_size=3)
    else:
        backend = peer.split()[1]
        if backend == "triton" and not ON_GPU:
            pytest.skip("triton on CPU is the Triton interpreter, a correctness tool: not benchmarked")
        block = vitkernels.SwinBlock(dim, (size, size), heads, window_size=7, shift_size=3,
                                     backend=None if backend == "auto" else backend)
    block.load_state_dict(weights)
    return block.to(device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-b{c[2]}" for c in CASES])
def test_swin_block(benchmark, case, peer):
    stage, mode, batch = case
    size, dim, heads = STAGES[stage]
    benchmark.group = f"swin_block {mode} | {stage} b{batch}"
    benchmark.extra_info["peer"] = peer
    torch.manual_seed(0)
    weights = reference.SwinTransformerBlock(dim, (size, size), heads, window_size=7, shift_size=3).state_dict()
    if not ON_GPU and peer.endswith("torch.compile") and mode == "fwd+bwd":
        pytest.skip("not run on CPU: compiling the block's backward takes minutes on 2 cores, beyond the CPU "
                    "suite's 10-minute budget (measured on GPU)")
    block = _make_block(peer, size, dim, heads, copy.deepcopy(weights))
    block.train(mode == "fwd+bwd")
    fn = compiled_or_skip(block, dynamic=False) if peer.endswith("torch.compile") else block
    x = torch.randn(batch, size, size, dim, device=DEVICE, dtype=DTYPE)
    try:
        with torch.no_grad():
            fn(x[:1])
    except vitkernels.BackendUnavailableError as exc:
        pytest.skip(str(exc).splitlines()[0])
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
