"""Loader for the C++ extension ``vitkernels._C`` (the ``native`` backend).

Importing ``vitkernels._C`` runs its ``TORCH_LIBRARY(vitkernels, m)`` registrations, after which the ops are
reachable as ``torch.ops.vitkernels.<name>``. The package works without it (the reference backend is always
there); :func:`native_unavailable_reason` says why an op cannot run natively on a device.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Optional

import torch

try:
    from vitkernels import _C  # noqa: F401  (registers torch.ops.vitkernels.*)

    IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or OSError / undefined symbols when built against another torch
    import importlib.util

    _C = None
    # a missing library reads "cannot import name '_C' from partially initialized module" (we are inside the
    # package's __init__): say plainly that it was not built
    _built = importlib.util.find_spec("vitkernels._C") is not None
    IMPORT_ERROR = (
        f"the C++ extension vitkernels._C is not available "
        f"({f'{type(exc).__name__}: {exc}' if _built else 'not built: no vitkernels/_C*.so'}); "
        "build it with `pip install --no-build-isolation -e .`"
    )

NAMESPACE = "vitkernels"


def is_loaded() -> bool:
    return _C is not None


def _read_build_info() -> Dict[str, str]:
    if _C is None:
        return {}
    text = torch.ops.vitkernels.build_info()
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)


def _read_kernel_table() -> Dict[str, FrozenSet[str]]:
    """op name -> dispatch keys with a kernel, read once: the table is fixed once the library is loaded, and
    torch.compile cannot trace the dispatcher query, so per-call checks look it up here instead."""
    if _C is None:
        return {}
    prefix = f"{NAMESPACE}::"
    table = {}
    for qualname in torch._C._dispatch_get_all_op_names():
        if qualname.startswith(prefix):
            keys = {k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k)}
            table[qualname[len(prefix):]] = frozenset(keys)
    return table


BUILD_INFO: Dict[str, str] = _read_build_info()
KERNELS: Dict[str, FrozenSet[str]] = _read_kernel_table()


def build_info() -> Dict[str, str]:
    """What the extension was built with (OpenMP, CUDA, compiler), as reported by the extension itself."""
    return dict(BUILD_INFO)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether ``vitkernels::op_name`` has a kernel registered for ``dispatch_key`` (``"CPU"``, ``"CUDA"``)."""
    return dispatch_key in KERNELS.get(op_name, ())


def native_unavailable_reason(op_name: str, device: torch.device) -> Optional[str]:
    """``None`` if ``torch.ops.vitkernels.<op_name>`` has a kernel for ``device``, else why not."""
    if _C is None:
        return IMPORT_ERROR
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return f"vitkernels._C has no kernels for device type {device.type!r}"
    if not has_kernel(op_name, key):
        if key == "CUDA" and BUILD_INFO.get("cuda") != "1":
            return "vitkernels._C was built without CUDA kernels (no CUDA build of torch or no CUDA toolkit at build time)"
        return f"vitkernels._C has no {key} kernel for {op_name}"
    return None
