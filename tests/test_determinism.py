"""Determinism: two forward + backward runs on the same inputs give bitwise-equal outputs and gradients, for every
backend that claims it (all of them: the reference; the native CPU kernels, whose per-thread partial sums are
reduced in a fixed order; the Triton kernels, which use no atomics: every reduction is a per-program partial summed
in a fixed order). Triton on CUDA only: the interpreter runs a grid's programs one after another, where two runs
cannot differ (the Triton kernels' results under it are checked against the reference elsewhere). Native on CPU
(and on CUDA when built with it). Only backends that can serve the call are parametrised; ``vitkernels.info`` says why a
missing one is missing.
"""
import pytest
import torch

import vitkernels
from vitkernels import dispatch

from helpers import triton_interpreter_or_cuda

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(fn, inputs):
    """Outputs of fn(*inputs) and the gradients of a fixed random projection of them w.r.t. ``inputs``."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    gen = torch.Generator().manual_seed(1)
    total = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
                for o in outs if o.is_floating_point() and o.requires_grad)
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    return [o.detach() for o in outs] + [g for g in grads if g is not None]


def _window_attention(case):
    B, H, W, nH, hd, window, shift = case
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, H, W, 3 * nH * hd, generator=gen),
              torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), nH, generator=gen),
              torch.randn(3 * nH * hd, generator=gen)]
    call = dispatch.Call(torch.device(DEV), torch.float32, {"window_size": window, "shift_size": shift,
                                                            "head_dim": hd, "num_heads": nH,
                                                            "tokens_per_window": window[0] * window[1]})

    def run(backend):
        return lambda qkv, table, bias: vitkernels.window_attention(qkv, table, window, shift, nH, qkv_bias=bias,
                                                                    backend=backend)

    return call, inputs, run


def _window_attention_v2(case):
    B, H, W, nH, hd, window, shift = case
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, H, W, 3 * nH * hd, generator=gen),
              16 * torch.rand((2 * window[0] - 1) * (2 * window[1] - 1), nH, generator=gen),
              torch.exp(torch.rand(nH, generator=gen) * 4.6),
              torch.randn(3 * nH * hd, generator=gen)]
    call = dispatch.Call(torch.device(DEV), torch.float32, {"window_size": window, "shift_size": shift,
                                                            "head_dim": hd, "num_heads": nH,
                                                            "tokens_per_window": window[0] * window[1]})

    def run(backend):
        return lambda qkv, table, scale, bias: vitkernels.window_attention_v2(qkv, table, scale, window, shift, nH,
                                                                              qkv_bias=bias, backend=backend)

    return call, inputs, run


def _window_partition(case):
    B, H, W, C, window, shift = case
    x = torch.randn(B, H, W, C, generator=torch.Generator().manual_seed(0))

    def run(backend):
        def fn(x_):
            windows = vitkernels.window_partition(x_, window, shift, backend=backend)
            return windows, vitkernels.window_reverse(windows * 2, H, W, window, shift, backend=backend)
        return fn

    return None, [x], run


def _patch_embed(case):
    B, C, H, W, D, patch = case
    gen = torch.Generator().manual_seed(0)
    L = (H // patch) * (W // patch)
    inputs = [torch.randn(B, C, H, W, generator=gen), torch.randn(D, C, patch, patch, generator=gen),
              torch.randn(D, generator=gen), torch.randn(1, 1 + L, D, generator=gen),
              torch.randn(1, 1, D, generator=gen)]

    def run(backend):
        return lambda *a: vitkernels.patch_embed(*a, backend=backend)

    return None, inputs, run


def _masking(case):
    N, L, D, ratio = case
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(N, L, generator=gen).to(DEV)
    perm = torch.randperm(L, generator=gen).to(DEV)
    inputs = [torch.randn(N, L, D, generator=gen), torch.randn(1, L, D, generator=gen),
              torch.randn(N, 1 + L, D, generator=gen), torch.randn(D, generator=gen)]

    def run(backend):
        def fn(x, pos, tokens, mask_token):
            kept, mask, ids_restore = vitkernels.random_masking(x, ratio, noise=noise, pos_embed=pos, backend=backend)
            cls = torch.cat([tokens[:, :1], kept], 1)
            decoded = vitkernels.mae_unshuffle(cls, ids_restore, mask_token, backend=backend)
            dropped, _ = vitkernels.msn_patch_drop(tokens, ratio, perm=perm, backend=backend)
            return kept, mask, decoded, dropped
        return fn

    return None, inputs, run


def _mae_loss(case):
    N, C, H, W, p = case
    gen = torch.Generator().manual_seed(0)
    L = (H // p) * (W // p)
    imgs = torch.randn(N, C, H, W, generator=gen).to(DEV)
    mask = (torch.rand(N, L, generator=gen) < 0.75).float().to(DEV)

    def run(backend):
        return lambda pred: vitkernels.mae_loss(imgs, pred, mask, p, norm_pix_loss=True, backend=backend)

    return None, [torch.randn(N, L, p * p * C, generator=gen)], run


def _dino_loss(case):
    B, K, ncrops = case
    gen = torch.Generator().manual_seed(0)
    center = torch.randn(1, K, generator=gen).to(DEV)
    inputs = [torch.randn(ncrops * B, K, generator=gen), torch.randn(2 * B, K, generator=gen)]

    def run(backend):
        return lambda s, t: vitkernels.dino_loss(s, t.detach(), center, ncrops, backend=backend)

    return None, inputs, run


def _msn_loss(case):
    B, V, K, D = case
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(V * B, D, generator=gen), torch.randn(B, D, generator=gen), torch.randn(K, D, generator=gen)]

    def run(backend):
        return lambda a, t, p: vitkernels.msn_loss(a, t.detach(), p, None, V, 0.1, 0.25, True, True, True,
                                                   backend=backend)

    return None, inputs, run


CASES = [  # (name, dispatch op(s), builder, case): every op with a backward, shapes that make several programs /
    # threads contribute to each reduction
    ("window_attention-ws7-shift-pad", ("window_attention",), _window_attention, (2, 9, 17, 2, 16, (7, 7), (3, 3))),
    ("window_attention-ws12-two-kernels", ("window_attention",), _window_attention,
     (1, 13, 12, 1, 16, (12, 12), (6, 6))),
    ("window_attention_v2-ws7-shift-pad", ("window_attention_v2",), _window_attention_v2,
     (2, 9, 17, 2, 16, (7, 7), (3, 3))),
    ("window_attention_v2-ws12-two-kernels", ("window_attention_v2",), _window_attention_v2,
     (1, 13, 12, 1, 16, (12, 12), (6, 6))),
    ("window_partition", ("window_partition", "window_reverse"), _window_partition, (2, 9, 10, 5, (7, 7), (3, 3))),
    ("patch_embed", ("patch_embed",), _patch_embed, (3, 3, 32, 48, 24, 8)),
    ("masking", ("random_masking", "mae_unshuffle", "msn_patch_drop"), _masking, (3, 20, 12, 0.6)),
    ("mae_loss", ("mae_loss",), _mae_loss, (2, 3, 16, 24, 4)),
    ("dino_loss", ("dino_loss",), _dino_loss, (3, 300, 4)),
    ("msn_loss", ("msn_loss",), _msn_loss, (3, 2, 40, 12)),
]
# every (case, backend) whose ops all have that backend registered (a backend an op does not have is not a test)
PARAMS = [pytest.param(builder, case, backend, ops[0], id=f"{name}-{backend}")
          for name, ops, builder, case in CASES
          for backend in ("reference", "native", "triton")
          if all(backend in dispatch.REGISTRY[op].implementations for op in ops)]


@pytest.mark.parametrize("builder,case,backend,op", PARAMS)
def test_two_backward_runs_are_bitwise_equal(builder, case, backend, op):
    call, inputs, run = builder(case)
    if backend == "triton":
        if DEV != "cuda":
            pytest.skip("the Triton interpreter runs a grid's programs one after another: two runs cannot differ")
        triton_interpreter_or_cuda(DEV)
    elif call is not None and backend == "native":
        reason = dispatch.REGISTRY[op].reasons(call)["native"]
        if reason is not None:
            pytest.skip(reason)
    inputs = [t.to(DEV) for t in inputs]
    first = _grads(run(backend), inputs)
    second = _grads(run(backend), inputs)
    assert len(first) == len(second) and len(first) > 1
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{backend}: result {i} differs between two runs"
