"""Shared test utilities: devices, per-dtype tolerances, and optional imports."""
import importlib

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


def triton_interpreter_or_cuda(device: str) -> None:
    """Skip unless Triton can run on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from vitkernels.triton import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device(device))
    if reason is not None:
        pytest.skip(reason)
