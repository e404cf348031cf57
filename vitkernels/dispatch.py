"""Per-call backend selection, in the style of xformers' fmha dispatch.

Every op has up to three implementations (``triton``, ``native`` = the C++ extension ``vitkernels._C``, and
``reference`` = plain PyTorch). Each states, for a given call, whether it can serve it and if not, why not, as a
human-readable reason. A call picks one with its ``backend`` argument, or else the ``VITKERNELS_BACKEND``
environment variable, or else ``"auto"``:

* ``"auto"``: the first implementation that can serve the call, in the order
  CUDA tensors: triton, native, reference; CPU tensors: native, reference. An implementation may also carry
  ``auto_checks``, measured preferences that make ``auto`` pass it over for a call it could serve (the oneDNN
  linear on an Intel CPU, where ATen's MKL GEMM measured faster); asked for by name it still runs.
  (Triton on CPU tensors means the Triton *interpreter*, a correctness tool hundreds of times slower than
  eager PyTorch: it is used only when asked for by name.)
* a backend name: that implementation, or :class:`BackendUnavailableError` listing why it cannot serve the call.

Under ``torch.compile`` the environment variable is read once, when the graph is traced (dynamo does not guard on
``os.environ``); pass ``backend=`` explicitly to change backends inside compiled code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("triton", "native", "reference")
BACKEND_ENV_VAR = "VITKERNELS_BACKEND"
_AUTO_ORDER = {
    "cuda": ("triton", "native", "reference"),
    "cpu": ("native", "reference"),
}
_TRITON_ON_CPU_REASON = (
    "auto never picks Triton for CPU tensors: that runs the Triton interpreter, a correctness tool far slower "
    "than eager PyTorch; pass backend='triton' to use it"
)


class BackendUnavailableError(NotImplementedError):
    """No implementation of an op can serve a call (or not the one requested); the message lists why."""


@dataclass(frozen=True)
class Call:
    """The facts about one call that an implementation's support check looks at.

    ``device`` and ``dtype`` are those of the op's main input; ``details`` holds op-specific facts
    (window size, head dim, ...), checked by the op's own ``supports`` functions.
    """

    device: torch.device
    dtype: torch.dtype
    details: Mapping[str, Any] = field(default_factory=dict)


SupportCheck = Callable[[Call], Optional[str]]


@dataclass
class Implementation:
    backend: str
    fn: Callable[..., Any]
    checks: Tuple[SupportCheck, ...]
    # checks that only keep ``auto`` from picking this implementation (it can serve the call, but something else
    # is preferred: e.g. the oneDNN linear on a CPU where MKL measured faster); asking for it by name still works
    auto_checks: Tuple[SupportCheck, ...] = ()

    def unsupported_reason(self, call: Call) -> Optional[str]:
        for check in self.checks:
            reason = check(call)
            if reason is not None:
                return reason
        return None

    def auto_skip_reason(self, call: Call) -> Optional[str]:
        """Why ``auto`` passes over this implementation for ``call`` (it cannot serve it, or is not preferred)."""
        reason = self.unsupported_reason(call)
        if reason is not None:
            return reason
        for check in self.auto_checks:
            reason = check(call)
            if reason is not None:
                return f"auto passes it over: {reason}"
        return None

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class Op:
    """One op's implementations, and the rule that picks one per call."""

    def __init__(self, name: str, doc: str = ""):
        self.name = name
        self.doc = doc
        self.implementations: Dict[str, Implementation] = {}
        self._missing: Dict[str, str] = {}

    def register(self, backend: str, *checks: SupportCheck,
                 auto_checks: Tuple[SupportCheck, ...] = ()) -> Callable[[Callable], Callable]:
        """Decorator registering ``fn`` as the ``backend`` implementation, served when all ``checks`` pass;
        ``auto`` also requires ``auto_checks`` to pass (a preference, not a capability)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

        def decorator(fn: Callable) -> Callable:
            self.implementations[backend] = Implementation(backend, fn, tuple(checks), tuple(auto_checks))
            self._missing.pop(backend, None)
            return fn

        return decorator

    def mark_missing(self, backend: str, reason: str) -> None:
        """Record why ``backend`` has no implementation of this op at all (not built, not written yet, ...)."""
        if backend not in self.implementations:
            self._missing[backend] = reason

    def reasons(self, call: Call) -> Dict[str, Optional[str]]:
        """For every backend: ``None`` if it can serve ``call``, else the reason it cannot."""
        return {backend: self._reason_for(backend, call) for backend in BACKENDS}

    def select(self, call: Call, backend: Optional[str] = None) -> Implementation:
        requested = resolve_backend_name(backend)
        if requested != "auto":
            reason = self._reason_for(requested, call)
            if reason is not None:
                raise BackendUnavailableError(
                    f"{self.name}: backend {requested!r} cannot serve this call "
                    f"({call.device.type}, {str(call.dtype).replace('torch.', '')}): {reason}"
                )
            return self.implementations[requested]
        order = _AUTO_ORDER.get(call.device.type, ("reference",))
        why_not: List[str] = []
        for name in order:
            reason = self._reason_for(name, call, auto=True)
            if reason is None:
                return self.implementations[name]
            why_not.append(f"  {name}: {reason}")
        raise BackendUnavailableError(
            f"{self.name}: no backend can serve this call ({call.device.type}, "
            f"{str(call.dtype).replace('torch.', '')}):\n" + "\n".join(why_not)
        )

    def auto_choice(self, call: Call) -> Tuple[Optional[str], Dict[str, Optional[str]]]:
        """The backend ``auto`` would pick for ``call`` (or None) and every backend's reason, for reports."""
        reasons = {name: self._reason_for(name, call, auto=True) for name in BACKENDS}
        if call.device.type == "cpu" and reasons.get("triton") is None:
            reasons["triton"] = _TRITON_ON_CPU_REASON
        for name in _AUTO_ORDER.get(call.device.type, ("reference",)):
            if reasons[name] is None:
                return name, reasons
        return None, reasons

    def _reason_for(self, backend: str, call: Call, auto: bool = False) -> Optional[str]:
        impl = self.implementations.get(backend)
        if impl is None:
            return self._missing.get(backend, f"no {backend} implementation of {self.name}")
        return impl.auto_skip_reason(call) if auto else impl.unsupported_reason(call)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={sorted(self.implementations)})"


REGISTRY: Dict[str, Op] = {}


def op(name: str, doc: str = "") -> Op:
    """Create (or fetch) the registered :class:`Op` called ``name``."""
    if name not in REGISTRY:
        REGISTRY[name] = Op(name, doc)
    return REGISTRY[name]


def resolve_backend_name(backend: Optional[str]) -> str:
    """``backend`` if given, else ``$VITKERNELS_BACKEND``, else ``"auto"``; validated."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str (one of 'auto', {', '.join(repr(b) for b in BACKENDS)}) or None, "
                        f"got {type(backend).__name__} {backend!r}")
    name = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        source = "backend" if backend is not None else BACKEND_ENV_VAR
        raise ValueError(f"{source} must be one of 'auto', {', '.join(repr(b) for b in BACKENDS)}; got {name!r}")
    return name


# --- support checks shared by many ops -------------------------------------------------------------------------

def dtypes_check(*dtypes: torch.dtype) -> SupportCheck:
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)

    def check(call: Call) -> Optional[str]:
        if call.dtype not in dtypes:
            return f"dtype {str(call.dtype).replace('torch.', '')} not supported (supports {names})"
        return None

    return check


def devices_check(*device_types: str) -> SupportCheck:
    def check(call: Call) -> Optional[str]:
        if call.device.type not in device_types:
            return f"device type {call.device.type!r} not supported (supports {', '.join(device_types)})"
        return None

    return check
