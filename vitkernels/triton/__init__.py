"""Triton kernels, one file per op: ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` and their host launchers.

This package imports without triton installed; the kernel modules themselves need it and are imported by
``vitkernels.ops`` only when :data:`HAS_TRITON` is true. Kernels run on CUDA tensors, or on CPU tensors under
the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which the tests use.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    TRITON_VERSION: Optional[str] = triton.__version__
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    HAS_TRITON = False
    TRITON_VERSION = None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ``triton.jit`` picks the interpreter or the GPU compiler when a kernel is defined, i.e. when vitkernels imports its
# kernel modules (with this package): a TRITON_INTERPRET set or cleared later changes nothing but the error.
_INTERPRET_AT_IMPORT = _interpret_env()


def interpreter_active() -> bool:
    """Whether Triton kernels run under the CPU interpreter (decided when vitkernels imported triton)."""
    return _INTERPRET_AT_IMPORT


def interpreter_env_changed() -> Optional[str]:
    """A message if ``TRITON_INTERPRET`` was set or cleared after vitkernels imported triton, else ``None``."""
    if _interpret_env() == _INTERPRET_AT_IMPORT:
        return None
    now = os.environ.get("TRITON_INTERPRET")
    was = "set" if _INTERPRET_AT_IMPORT else "not set"
    return (f"TRITON_INTERPRET is {now!r} now but was {was} when vitkernels imported triton, and Triton decides "
            "between its CPU interpreter and the GPU compiler at import: set it before the first import of "
            "vitkernels or triton (e.g. `TRITON_INTERPRET=1 python ...`, or os.environ at the very top of the script)")


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` if Triton kernels can run on tensors on ``device``, else why not."""
    if not HAS_TRITON:
        return _IMPORT_ERROR
    changed = interpreter_env_changed()
    if changed is not None:
        return changed
    if device.type == "cuda":
        if interpreter_active():
            return "TRITON_INTERPRET=1 is set: Triton runs kernels on CPU tensors only"
        return None
    if device.type == "cpu":
        if not interpreter_active():
            return "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
        return None
    return f"Triton kernels do not run on device type {device.type!r}"
