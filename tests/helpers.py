"""Shared test utilities: devices, per-dtype tolerances, optional imports, the Triton interpreter's overflow checks."""
import contextlib
import dataclasses
import functools
import importlib
import inspect
import threading
from collections import Counter
from typing import Iterator, Optional, Tuple

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF_DTYPES = [torch.float16, torch.bfloat16]

# Tolerances for a result in ``dtype`` compared with the float64 reference (float32 for half inputs).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference is computed in when checking a result in ``dtype``."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, **overrides) -> None:
    dtype = dtype or actual.dtype
    kw = {**tol(dtype), **overrides}
    torch.testing.assert_close(actual.to(expected.dtype), expected, **kw)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Per-dtype tolerance with the absolute part scaled by the magnitude of the expected values (for results that
    are sums of many terms or come from large inputs)."""
    t = tol(dtype)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=t["atol"] * scale, rtol=t["rtol"])


def import_timm():
    """Import timm (with the torchvision stub set up by conftest) or skip the test."""
    try:
        return importlib.import_module("timm")
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"timm not importable: {type(exc).__name__}: {exc}")


@functools.lru_cache(maxsize=None)
def _timm_swinv2_pads_shifted_mask() -> bool:
    """Whether the installed timm's ``SwinTransformerV2Block`` builds its shifted-window ``attn_mask`` for a map the
    window does not divide (feature test: a 3 x 3 map, window 2, shift 1). timm >= 1.0.31 pads the mask as ``_attn``
    pads the input; timm 1.0.29 builds it on the unpadded map and its ``window_partition`` raises."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    try:
        SwinTransformerV2Block(4, (3, 3), 1, window_size=2, shift_size=1)
    except RuntimeError:
        return False
    return True


def skip_unless_timm_swinv2_pads(needed: bool = True, error: Optional[BaseException] = None) -> None:
    """Skip a comparison with timm's Swin V2 that ``needed`` a shifted window over a padded map (H or W not a
    multiple of the window) when the installed timm cannot build that block or model (see
    :func:`_timm_swinv2_pads_shifted_mask`); ``error`` is what timm raised, for the reason."""
    timm = import_timm()
    if needed and not _timm_swinv2_pads_shifted_mask():
        pytest.skip(
            f"timm {timm.__version__} lacks Swin V2 padding of a shifted window's attn_mask for a map the window does "
            "not divide (timm >= 1.0.31 pads it)" + (f": {type(error).__name__}: {error}" if error is not None else "")
        )


def needs_padded_shift(input_resolution, window_size, shift_size) -> bool:
    """A shifted window over a map whose H or W is not a multiple of the (clamped) window."""
    return any(shift_size) and any(r % w for r, w in zip(input_resolution, window_size))


def build_timm_swinv2_or_skip(build):
    """``build()`` (a timm Swin V2 block, stage or model); where timm raises and the installed timm lacks Swin V2
    padding of shifted-window masks, the test is skipped for that reason instead (otherwise the error propagates)."""
    try:
        return build()
    except RuntimeError as exc:
        skip_unless_timm_swinv2_pads(needed=True, error=exc)
        raise


def triton_interpreter_or_cuda(device: str) -> None:
    """Skip unless Triton can run on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from vitkernels.triton import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device(device))
    if reason is not None:
        pytest.skip(reason)


def _interpreter_builder():
    """The Triton interpreter's builder (its ``options`` are what every interpreted kernel reads), or None."""
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - triton missing or a layout this helper does not know
        return None
    builder = getattr(interpreter, "interpreter_builder", None)
    return builder if hasattr(getattr(builder, "options", None), "sanitize_overflow") else None


def set_interpreter_options(sanitize_overflow: bool, debug: bool) -> Optional[Tuple[bool, bool]]:
    """Set the Triton interpreter's ``sanitize_overflow`` and ``debug``; returns the previous pair (pass it back here
    to restore them), or None without an interpreter."""
    builder = _interpreter_builder()
    if builder is None:
        return None
    previous = (builder.options.sanitize_overflow, builder.options.debug)
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=bool(sanitize_overflow), debug=bool(debug))
    return previous


def set_interpreter_overflow_checks(enabled: bool) -> Optional[Tuple[bool, bool]]:
    """The Triton interpreter's int32 overflow checks on and asserting (with ``debug``), or off; returns the previous
    options as :func:`set_interpreter_options` does.

    Under TRITON_INTERPRET=1 Triton computes, by default, every int32 ``+``, ``-``, ``*`` of a kernel a second time in
    int64 with a range compare, and then drops the assert because ``debug`` is off: the check costs more than half
    the time of the index-heavy window-attention kernels (a 7x7x7-window example: 24 s with it, 11 s without) and
    checks nothing. tests/conftest.py turns it off for the session; the launch-configuration examples that are cheap
    enough turn it on with ``debug`` (:func:`interpreter_overflow_checks`), so there it really asserts."""
    return set_interpreter_options(enabled, enabled)


@contextlib.contextmanager
def interpreter_overflow_checks(enabled: bool = True) -> Iterator[None]:
    """The block with the interpreter's int32 overflow checks asserting (or off); restored after."""
    previous = set_interpreter_overflow_checks(enabled)
    try:
        yield
    finally:
        if previous is not None:
            set_interpreter_options(*previous)


def skip_interpreter_repatching_in_device_calls() -> bool:
    """Make the Triton interpreter stop re-patching ``triton.language`` at every ``@triton.jit`` helper call made
    inside a running kernel; returns whether it could (False: not the interpreter layout this knows, nothing changed).

    Under TRITON_INTERPRET=1 a kernel launch (``GridExecutor.__call__``) replaces the builtins of the language
    modules its function sees (``_patch_lang``) for the launch and restores them after; a helper's call
    (``InterpretedFunction.__call__``) then does the same again, with ``inspect.getmembers`` over ``tl``,
    ``tl.tensor`` and ``tl.math``, though the modules it sees are already patched: ~1.4 ms per helper call, a quarter
    of a 7x7x7-window attention example's time (34 k helper calls, 10 s of 43 s profiled). Here a helper call made
    while its launch's patch is in place, seeing no language module that patch did not cover, patches nothing; any
    other call patches as before. What the kernels compute is unchanged."""
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - triton missing
        return False
    grid_call = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    patch_lang, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if getattr(patch_lang, "_vitkernels", False):
        return True  # installed already
    if grid_call is None or patch_lang is None or scope_type is None:
        return False
    state = threading.local()
    seen = {}

    def languages(fn):  # the language modules _patch_lang patches for fn (a module's globals: read once)
        if fn not in seen:
            seen[fn] = {id(v) for v in fn.__globals__.values()
                        if inspect.ismodule(v) and v in (interpreter.tl, interpreter.tl.core)}
        return seen[fn]

    def patch_lang_once(fn):
        patched = getattr(state, "patched", None)
        if patched is not None and languages(fn) <= patched:
            return scope_type()  # nothing set: nothing to restore
        scope = patch_lang(fn)
        if patched is None and getattr(state, "in_launch", False):
            state.patched = languages(fn)  # the launch's own patch: in place until the launch ends
        return scope

    def launch(self, *args, **kwargs):
        outer = (getattr(state, "in_launch", False), getattr(state, "patched", None))
        state.in_launch, state.patched = True, None
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            state.in_launch, state.patched = outer

    patch_lang_once._vitkernels = True
    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch
    return True


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """Norm-wise relative error ||actual - expected|| / max(||expected||, floor), in float64."""
    return ((actual.double() - expected.double()).norm() / max(expected.double().norm().item(), floor)).item()


def assert_grads_close(patched: torch.nn.Module, original: torch.nn.Module, tol: float) -> None:
    """Every parameter gradient of ``patched`` within ``tol`` norm-wise relative error of ``original``'s (same
    parameter names); a gradient that is zero in exact arithmetic (e.g. an attention k bias, which adds the same
    q.b_k to a whole row of scores) is compared against 1e-3 of the largest gradient instead."""
    grads = dict(patched.named_parameters())
    expected = {name: p.grad for name, p in original.named_parameters() if p.grad is not None}
    assert expected and all(grads[name].grad is not None for name in expected)
    floor = 1e-3 * max(g.double().norm().item() for g in expected.values())
    for name, grad in expected.items():
        assert rel_err(grads[name].grad, grad, floor) < tol, name


def perturb_parameters(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Add seeded N(0, scale^2) noise to every parameter (libraries zero-initialise biases and bias tables, which
    would hide a wrong bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * scale)
    return model


def native_or_skip(backend: str) -> None:
    """Skip when ``backend`` is "native" and the C++ extension is not built."""
    import vitkernels

    if backend == "native" and not vitkernels._native.is_loaded():
        pytest.skip(vitkernels._native.IMPORT_ERROR)


def vitkernels_op_or_skip(name: str) -> None:
    """Skip when vitkernels._C has no op ``torch.ops.vitkernels.<name>``."""
    if not hasattr(torch.ops.vitkernels, name):
        pytest.skip(f"vitkernels._C has no {name}")


def linears_on_own_gemm(monkeypatch, own_gemm: bool = True) -> None:
    """Make the layers' float32 CPU Linears run as on an AVX2-only AMD CPU: oneDNN as the CPU GEMM and, with
    ``own_gemm``, vitkernels' own GEMM (``vitkernels.ops.linear.CPU_GEMM`` / ``OWN_GEMM``, read at call time);
    skips where this PyTorch build has no oneDNN."""
    from vitkernels.ops import linear as linear_op

    if not linear_op.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(linear_op, "CPU_GEMM", "onednn")
    monkeypatch.setattr(linear_op, "OWN_GEMM", own_gemm)


class OpCalls:
    """Context manager recording the names of the ops dispatched inside it (``aten::mm``,
    ``vitkernels::gelu_mlp``, ...): which kernels a fast path actually called."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class _Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names.append(func.name())
                return func(*args, **(kwargs or {}))

        self._mode = _Record()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def compile_recording_graphs(fn, **compile_kwargs):
    """``torch.compile(fn, fullgraph=True, backend=<aot_eager, recording>, **compile_kwargs)`` (aot_eager: no
    codegen, quick) and the list that collects the FX graphs it traces; dynamo is reset first. Count the custom ops
    in them with :func:`vitkernels_ops`."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs, aot_eager = [], lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend, **compile_kwargs), graphs


def vitkernels_ops(graphs) -> Counter:
    """How many times each ``torch.ops.vitkernels`` op (by name, overload dropped) is called in ``graphs``."""
    return Counter(str(n.target).split(".")[1] for g in graphs for n in g.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("vitkernels."))
