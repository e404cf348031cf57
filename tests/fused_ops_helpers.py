"""Checks shared by the tests of the fused CPU row ops (bias_gelu, bias_residual, bias_residual_layernorm,
patch_merging_norm, window_attention_add_bias): a backend's forward and gradients against the reference computed in
float64 (float32 for half inputs), on random inputs, with the per-dtype tolerances of helpers.py."""
import os

import pytest
import torch

from vitkernels import _native

from helpers import assert_close_scaled, reference_dtype

CPU_ISAS = ["avx512", "avx2", "baseline"]  # the native kernels' instruction-set builds, best first
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def native_or_skip(op_name: str) -> None:
    reason = _native.native_unavailable_reason(op_name, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def selected_cpu_isa() -> str:
    """The instruction-set build the native kernels run now (build_info's cpu_isa: VITKERNELS_CPU_ISA's cap applied)."""
    info = torch.ops.vitkernels.build_info()
    return dict(item.split("=") for item in info.split(";") if "=" in item)["cpu_isa"]


def best_cpu_isa() -> str:
    """The best instruction-set build of the native kernels this CPU runs (what they run without a
    VITKERNELS_CPU_ISA cap)."""
    saved = os.environ.pop("VITKERNELS_CPU_ISA", None)
    try:
        return selected_cpu_isa()
    finally:
        if saved is not None:
            os.environ["VITKERNELS_CPU_ISA"] = saved


def runnable_cpu_isas() -> list:
    """The builds of CPU_ISAS this CPU runs: a cap above them runs the best one, the same code as its own case."""
    return CPU_ISAS[CPU_ISAS.index(best_cpu_isa()):]


def use_cpu_isa(monkeypatch, isa: str) -> None:
    """Caps the native kernels at the ``isa`` build (VITKERNELS_CPU_ISA) for the test; skips where this CPU cannot
    run it (an AVX-512 cap on an AVX2 CPU runs the AVX2 build: that build's own case, on the same inputs)."""
    if isa not in runnable_cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} build (capped there the kernels run the {best_cpu_isa()} build, "
                    "which its own case checks)")
    monkeypatch.setenv("VITKERNELS_CPU_ISA", isa)


def forward_and_grads(fn, inputs, grads_out=None, seed=2):
    """``fn(*inputs)`` (a tensor or a tuple of tensors) and the gradients of the inputs that require grad, for
    random output gradients (returned too, to reuse for the reference)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grads_out is None:
        gen = torch.Generator().manual_seed(seed)
        grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad([o for o in outs], leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)],
                                allow_unused=True) if leaves else []
    return outs, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)], grads_out


def check_against_reference(fast, reference, make_inputs, dtype):
    """``fast`` vs ``reference`` (same signature): outputs and input gradients. ``make_inputs(dtype)`` builds the
    inputs (the same random values for each dtype: seed it)."""
    inputs = make_inputs(dtype)
    outs, grads, grads_out = forward_and_grads(fast, inputs)
    ref_inputs = make_inputs(reference_dtype(dtype))
    ref_outs, ref_grads, _ = forward_and_grads(reference, ref_inputs, grads_out)
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    for o, r in zip(outs, ref_outs):
        assert o.shape == r.shape and o.dtype == dtype
        assert_close_scaled(o, r, dtype)
    for g, r, t in zip(grads, ref_grads, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close_scaled(g, r, dtype)


def leaf(t: torch.Tensor, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return t.to(dtype).requires_grad_(grad)


def assert_bf16_bitwise(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """``got`` (bfloat16) holds exactly the bits of ``want`` rounded to bfloat16 (NaN payloads included)."""
    assert got.dtype == torch.bfloat16, f"{name}: {got.dtype}"
    want = want.to(torch.bfloat16)
    assert got.shape == want.shape, f"{name}: {got.shape} vs {want.shape}"
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name}: differs from the float op rounded"


def widen(*tensors):
    """Each tensor as float32 (None stays None): the bfloat16 ops' specification is the float op on these."""
    return [None if t is None else t.float() for t in tensors]


def check_split_across_threads(fast, make_inputs, dtype=torch.float32):
    """``fast``'s outputs and gradients with the rows split over two threads (the shape must span two of the row
    ops' tasks: 256 KB of rows each) are the one-thread ones: rows bitwise, parameter gradients (column sums, in
    double across the tasks) within float rounding."""
    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return forward_and_grads(fast, make_inputs(dtype))
        finally:
            torch.set_num_threads(before)
    one_outs, one_grads, _ = run(1)
    two_outs, two_grads, _ = run(2)
    for a, b in zip(one_outs, two_outs):
        assert torch.equal(a, b)
    for a, b in zip(one_grads, two_grads):  # float partial sums of other rows: float rounding of the sums' scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def residual_layernorm_inputs(shape, with_bias=True, with_scale=True, affine=True, normalised="residual"):
    """``make(dtype)`` for the LayerNorm row ops' signature ``(y, bias, residual, weight, ln_bias, eps, scale)``: the
    same float64 draws for every dtype (seeded), optional bias, drop-path scale (a zero and a non-unit factor) and
    LayerNorm affine; ``normalised`` (``"residual"`` or ``"y"``) gets a non-zero mean and a wider spread, since it
    dominates what the LayerNorm sees (bias_residual_layernorm normalises residual + y, bias_layernorm_residual y)."""
    def make(dtype):
        gen = torch.Generator().manual_seed(0)
        y = torch.randn(shape, generator=gen, dtype=torch.float64)
        b = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        if normalised == "residual":
            r = 3 * r + 1
        else:
            y = 3 * y + 1
        w = 1 + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
        lb = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
        s = torch.tensor([0.0, 1.25, 1.25, 1.25][:shape[0]], dtype=torch.float64)
        return (leaf(y, dtype), leaf(b, dtype) if with_bias else None, leaf(r, dtype),
                leaf(w, dtype) if affine else None, leaf(lb, dtype) if affine else None, 1e-5,
                s.to(dtype) if with_scale else None)
    return make
