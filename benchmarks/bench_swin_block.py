"""Whole Swin block (LN, shifted-window attention with its Linears, MLP, residuals) vs timm, every peer side by side.

Peers: ``timm eager`` (timm ``SwinTransformerBlock``, its default non-fused attention), ``timm sdpa`` (the same block
with ``attn.fused_attn = True``: scaled_dot_product_attention with the bias + mask as a materialised float mask),
``timm torch.compile``, ``reference eager`` / ``reference torch.compile`` (vitkernels.reference, timm's arithmetic),
and ``vitkernels.SwinBlock`` on each backend. Modes: ``inference`` (eval, no_grad) and ``fwd+bwd`` (a training
step's forward and backward, parameters' gradients included).

Shapes: Swin-T stage 1 (56x56, C 96, 3 heads) and stage 3 (14x14, C 384, 12 heads), window 7, shift 3; batch 128 on
a GPU (bf16); on CPU (fp32, 2 cores) batch 8 for inference -- the native-backend target shape -- and batch 2 for
fwd+bwd. Every peer's output (and input gradient) is checked against the float64 reference block holding the same
weights before timing. Every peer but timm eager is also timed in alternation with timm eager (12 pairs,
``extra_info["vs_baseline"]``, the report's "speedup, interleaved" column; see ``bench_models``). On CPU the
torch.compile peers of fwd+bwd are marked ``heavy`` (compiling a block's backward takes minutes on 2 cores):
``-m "not heavy"`` leaves them out.

Two floors, not peers (as in ``bench_models``): the block's four Linears alone (qkv, proj, fc1, fc2 at the block's
token count; forward, and for fwd+bwd their input and weight gradients), nothing else -- ``GEMM floor (Linear
only)`` through ``F.linear`` (timm's), ``GEMM floor (vitkernels linear)`` through :func:`vitkernels.linear` (the
GEMM backend ``vitkernels.SwinBlock`` runs its Linears' weights with on CPU; on CUDA it is ``F.linear``, the same
code: skipped). A floor's speedup over timm eager is the most any block built on those GEMMs can reach: the attention,
norms, GELU and residuals in zero time. Every row's TFLOP/s counts the Linears' and the attention's matmuls
(2 x tokens x (12 C^2 + 2 x 49 C) multiply-adds per forward, x 3 for fwd+bwd); a floor's, its Linears' only.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import vitkernels
from vitkernels.reference import swin as reference

from conftest import (
    DEVICE, TRITON_ON_CPU, assert_agrees, compiled_or_skip, interleaved_speedup, linear_floor, run_benchmark,
    skip_auto_if_same, timm_or_none, timm_or_skip,
)

ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
STAGES = {
    "swin-t stage1 56x56 C96 h3": (56, 96, 3),
    "swin-t stage3 14x14 C384 h12": (14, 384, 12),
}
CASES = []  # (stage, mode, batch)
for stage in STAGES:
    CASES.append((stage, "inference", 128 if ON_GPU else 8))
    # CPU fwd+bwd: batch 2 at stage 1 (12544 tokens), 8 at stage 3 (1568 tokens: the deep stages' few windows)
    CASES.append((stage, "fwd+bwd", 128 if ON_GPU else (2 if stage.startswith("swin-t stage1") else 8)))
BASELINE = "timm eager"
# (timm eager, peer) pairs timed in alternation, per peer: with 6, two runs of the same code differed by up to 0.25x
INTERLEAVED_ROUNDS = 12
GEMM_FLOOR = "GEMM floor (Linear only)"
GEMM_FLOOR_VK = "GEMM floor (vitkernels linear)"
PEERS = ["timm eager", "timm sdpa", "timm torch.compile", "reference eager", "reference torch.compile",
         "vitkernels auto", "vitkernels triton", "vitkernels native", GEMM_FLOOR, GEMM_FLOOR_VK]
MLP_RATIO = 4  # the blocks' (Swin-T's) MLP width: fc1 C -> 4C


def _timed_step(fn, x, grad, train):
    """The timed call of block ``fn``: inference under no_grad on ``x``, or forward + backward of ``grad`` through a
    leaf copy of ``x`` (its gradient reset each call)."""
    if not train:
        def step():
            with torch.no_grad():
                return fn(x)
        return step
    xg = x.clone().requires_grad_()

    def step():
        xg.grad = None
        fn(xg).backward(grad)
    return step


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
            pytest.skip(TRITON_ON_CPU)
        block = vitkernels.SwinBlock(dim, (size, size), heads, window_size=7, shift_size=3,
                                     backend=None if backend == "auto" else backend)
    block.load_state_dict(weights)
    return block.to(device=DEVICE, dtype=DTYPE)


def _params():
    for case in CASES:
        for peer in PEERS:
            heavy = not ON_GPU and case[1] == "fwd+bwd" and peer.endswith("torch.compile")
            yield pytest.param(case, peer, marks=[pytest.mark.heavy] if heavy else [],
                               id=f"{case[0]}-{case[1]}-b{case[2]}-{peer}")


def _block_flops(tokens, dim, train):
    """FLOPs of a block step: its Linears (qkv 3C^2, proj C^2, fc1 and fc2 4C^2 each: 12 C^2 multiply-adds per token)
    and its attention's two matmuls (q k^T and P v: 2 x 49 C per token, window 7); x 3 for fwd+bwd."""
    macs = tokens * (3 + 1 + 2 * MLP_RATIO) * dim * dim + tokens * 2 * 49 * dim
    return 2 * macs * (3 if train else 1)


def _time_floor(benchmark, peer, weights, x, grad, train, size, dim, heads):
    """The GEMM floor rows (module docstring): the Linears captured from the reference block (vitkernels.SwinBlock
    runs its Linears' weights as GEMMs, not through their modules), timed like the peers, and in alternation with
    timm eager."""
    if peer == GEMM_FLOOR_VK and ON_GPU:
        pytest.skip("off the CPU vitkernels.linear is F.linear: the same code as the 'GEMM floor (Linear only)' row")
    block = reference.SwinTransformerBlock(dim, (size, size), heads, window_size=7, shift_size=3)
    block.load_state_dict(weights)
    block = block.to(device=DEVICE, dtype=DTYPE).train(train)
    floor, flops = linear_floor(block, lambda: block(x), train,
                                linear=vitkernels.linear if peer == GEMM_FLOOR_VK else F.linear)
    if not getattr(benchmark, "disabled", False) and timm_or_none() is not None:
        baseline_block = _make_block(BASELINE, size, dim, heads, copy.deepcopy(weights)).train(train)
        interleaved_speedup(benchmark, _timed_step(baseline_block, x, grad, train), floor, baseline=BASELINE,
                            rounds=INTERLEAVED_ROUNDS)
    run_benchmark(benchmark, floor, peer=peer, flops=flops)


@pytest.mark.parametrize("case,peer", list(_params()))
def test_swin_block(benchmark, case, peer):
    stage, mode, batch = case
    size, dim, heads = STAGES[stage]
    train = mode == "fwd+bwd"
    benchmark.group = f"swin_block {mode} | {stage} b{batch}"
    benchmark.extra_info["peer"] = peer
    torch.manual_seed(0)
    ref64 = reference.SwinTransformerBlock(dim, (size, size), heads, window_size=7, shift_size=3)
    weights = ref64.state_dict()
    if peer in (GEMM_FLOOR, GEMM_FLOOR_VK):
        x = torch.randn(batch, size, size, dim, device=DEVICE, dtype=DTYPE)
        _time_floor(benchmark, peer, weights, x, torch.randn_like(x), train, size, dim, heads)
        return
    block = _make_block(peer, size, dim, heads, copy.deepcopy(weights))
    block.train(train)
    ref64 = ref64.to(device=DEVICE, dtype=torch.float64).train(train)
    fn = compiled_or_skip(block, dynamic=False) if peer.endswith("torch.compile") else block
    x = torch.randn(batch, size, size, dim, device=DEVICE, dtype=DTYPE)
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)

    def once():
        if not train:
            with torch.no_grad():
                return fn(x)
        xg.grad = None
        out = fn(xg)
        out.backward(grad)
        return out, xg.grad

    try:
        if peer == "vitkernels auto":
            skip_auto_if_same(once)
        got = once()
    except vitkernels.BackendUnavailableError as exc:
        pytest.skip(str(exc).splitlines()[0])
    x64 = x.double().requires_grad_(train)
    expected = ref64(x64)
    if train:
        expected.backward(grad.double())
        expected = (expected, x64.grad)
    assert_agrees(benchmark, got, expected)
    bytes_moved = 2 * x.numel() * x.element_size()  # the block's input read, output written (a lower bound)
    if train:
        bytes_moved *= 2
    run = _timed_step(fn, x, grad, train)
    if peer != BASELINE and not getattr(benchmark, "disabled", False) and timm_or_none() is not None:
        # the speedup over timm eager timed in alternation with it (conftest.interleaved_speedup): on a VM whose
        # speed drifts, the separately timed medians' ratio followed the drift more than the peers
        baseline_block = _make_block(BASELINE, size, dim, heads, copy.deepcopy(weights)).train(train)
        run_baseline = _timed_step(baseline_block, x, grad, train)
        interleaved_speedup(benchmark, run_baseline, run, baseline=BASELINE, rounds=INTERLEAVED_ROUNDS)
    run_benchmark(benchmark, run, peer=peer, bytes_moved=bytes_moved, flops=_block_flops(x.numel() // dim, dim, train))
