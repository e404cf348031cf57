"""Launching Triton kernels: the GPU a launch is for, launch configurations, and the launcher itself.

Every Triton kernel has one launch-configuration table in its op's file: a pure function of the problem (shape,
dtype) and the :class:`Target` (compute capability, shared memory per block, multiprocessors) returning a
:class:`LaunchConfig` (tile constexprs, warps, stages), plus ``table_examples()`` listing every configuration the
table can return, each with a tiny problem that selects it. The launcher uses the table on the GPU; the compile gate
(``tools/compile_gate.py``) compiles every example for sm_80 and sm_90 without a GPU; the tests
(``tests/test_triton_launch_configs.py``) run every example under the interpreter against the reference.

Under the interpreter the tables see :data:`INTERPRETER`: the sm_90 configurations (so they are the ones tested),
with a single "multiprocessor" so that programs that loop over several windows / rows do so on tiny shapes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch

from vitkernels.triton import interpreter_active


@dataclass(frozen=True)
class Target:
    """What a launch-configuration table may look at about the GPU."""

    arch: str                      # "sm_80", "sm_90", ... or "interpreter"
    capability: Tuple[int, int]
    smem_per_block: int            # bytes of shared memory one program may use (the opt-in maximum)
    num_sms: int                   # multiprocessors: sizes grids that loop (several windows / rows per program)

    @property
    def interpreter(self) -> bool:
        return self.arch == "interpreter"


SM80 = Target("sm_80", (8, 0), 166912, 108)   # A100: 163 KiB per block
SM90 = Target("sm_90", (9, 0), 232448, 132)   # H100 / H200: 227 KiB per block
GATE_TARGETS = (SM80, SM90)                   # what the compile gate compiles for
INTERPRETER = Target("interpreter", (9, 0), SM90.smem_per_block, 1)

_state = threading.local()


@contextlib.contextmanager
def forced_target(target: Target) -> Iterator[None]:
    """Make :func:`device_target` return ``target`` (the gate and the tests select a GPU's tables this way)."""
    previous = getattr(_state, "target", None)
    _state.target = target
    try:
        yield
    finally:
        _state.target = previous


def device_target(device: torch.device) -> Target:
    """The :class:`Target` of a launch on ``device``: the CUDA device's properties, else the interpreter's."""
    forced = getattr(_state, "target", None)
    if forced is not None:
        return forced
    if device.type == "cuda" and not interpreter_active():
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


_CUDA_TARGETS: Dict[int, Target] = {}


def _cuda_target(index: int) -> Target:
    if index not in _CUDA_TARGETS:
        props = torch.cuda.get_device_properties(index)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 49152
        _CUDA_TARGETS[index] = Target(f"sm_{props.major}{props.minor}", (props.major, props.minor), int(smem),
                                      int(props.multi_processor_count))
    return _CUDA_TARGETS[index]


@dataclass(frozen=True)
class LaunchConfig:
    """Tile constexprs (name -> value), warps and pipeline stages of one kernel launch."""

    tiles: Tuple[Tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 1

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: int = 1, **tiles: int) -> "LaunchConfig":
        return cls(tuple(tiles.items()), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.tiles)[name]

    def kwargs(self) -> Dict[str, int]:
        """Keyword arguments of the launch: the tiles and ``num_warps`` / ``num_stages``."""
        return {**dict(self.tiles), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @property
    def label(self) -> str:
        return " ".join([f"{k}={v}" for k, v in self.tiles] + [f"w{self.num_warps}", f"s{self.num_stages}"])


def half_dtype(target: Target) -> torch.dtype:
    """The half dtype the examples of a target use: bf16 for sm_90, fp16 for sm_80 (so both are compiled and run
    under the interpreter without doubling the examples)."""
    return torch.bfloat16 if target.capability >= (9, 0) else torch.float16


@dataclass(frozen=True)
class Example:
    """A problem that makes a table return some configurations on ``target``.

    ``problem`` is op-specific (the inputs of the op's table and a runnable tiny case); ``configs`` maps each kernel
    the problem launches to the configuration the table returns for it.
    """

    op: str
    problem: Any
    target: Target
    configs: Mapping[str, LaunchConfig]


# --- launching and recording ----------------------------------------------------------------------------------------

@dataclass
class Launch:
    """One recorded launch: the kernel, its grid, its arguments."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def config(self) -> LaunchConfig:
        """The launch's tile constexprs (``BLOCK_*`` but those its kernel declares shape constexprs, and the names
        it declares tiles, see :func:`tile_names`), warps, stages."""
        names = set(getattr(self.kernel, "tile_names", ())) | {k for k in self.kwargs if k.startswith("BLOCK_")}
        names -= set(getattr(self.kernel, "shape_names", ()))
        tiles = tuple((k, v) for k, v in self.kwargs.items() if k in names)
        return LaunchConfig(tiles, self.kwargs.get("num_warps", 4), self.kwargs.get("num_stages", 1))


class _Recording:
    def __init__(self, launch: bool):
        self.launch = launch
        self.launches: List[Launch] = []


_recordings: List[_Recording] = []


@contextlib.contextmanager
def recording(launch: bool = True) -> Iterator[List[Launch]]:
    """Record every Triton launch made inside the block; with ``launch=False`` nothing runs (the compile gate calls
    the host launchers with meta tensors this way)."""
    rec = _Recording(launch)
    _recordings.append(rec)
    try:
        yield rec.launches
    finally:
        _recordings.remove(rec)


class _Launcher:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)

        def call(*args, **kwargs):
            check_arguments(self.kernel, args, kwargs)
            launch = True
            for rec in _recordings:
                rec.launches.append(Launch(self.kernel, grid, args, dict(kwargs)))
                launch = launch and rec.launch
            if not launch:
                return None
            if interpreter_active():
                return self.kernel[grid](*args, **kwargs)
            return torch.library.wrap_triton(self.kernel)[grid](*args, **kwargs)

        return call


# Keyword arguments of a launch that are Triton's options, not the kernel's parameters.
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion"})


@functools.lru_cache(maxsize=None)
def _binding(fn, n_positional: int) -> Tuple[frozenset, frozenset, frozenset]:
    """For a kernel function called with ``n_positional`` positional arguments: the names it may take by keyword, the
    names the positional arguments already bind, the names that must come by keyword (no default). Cached: a launch
    should not pay inspect.signature (~20 us)."""
    params = list(inspect.signature(fn).parameters.values())
    if n_positional > len(params):
        raise TypeError(f"{fn.__name__}: {n_positional} positional arguments for {len(params)} parameters")
    rest = params[n_positional:]
    return (frozenset(p.name for p in params) | LAUNCH_OPTIONS, frozenset(p.name for p in params[:n_positional]),
            frozenset(p.name for p in rest if p.default is inspect.Parameter.empty))


def check_arguments(kernel, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` unless ``args`` / ``kwargs`` bind exactly to ``kernel``'s parameters (plus Triton's launch
    options): a keyword the kernel does not have, a parameter given twice, one missing without a default.

    A compiled launch refuses all of these (``KeyError: Keyword argument ... unrecognised``, or ``Incorrect number
    of arguments`` inside torch.compile) but the interpreter ignores an unknown keyword, so without this check a
    launcher that passes one kernel's constexprs to another passes every CPU test and fails on the first GPU.
    """
    fn = getattr(kernel, "fn", None)  # the Python function of a JITFunction, or of the interpreter's wrapper
    if fn is None or not inspect.isfunction(fn):  # an autotuner / heuristics wrapper: Triton checks at launch
        return
    allowed, positional, required = _binding(fn, len(args))
    keys = kwargs.keys()
    unknown = keys - allowed
    if unknown:
        raise TypeError(f"{fn.__name__}: keyword arguments that are not its parameters: {', '.join(sorted(unknown))}")
    twice = positional & keys
    if twice:
        raise TypeError(f"{fn.__name__}: parameters given both by position and by keyword: {', '.join(sorted(twice))}")
    missing = required - keys
    if missing:
        raise TypeError(f"{fn.__name__}: parameters not given: {', '.join(sorted(missing))}")


def launcher(kernel) -> _Launcher:
    """``kernel`` wrapped for launch from a ``torch.library.triton_op`` body: ``launcher(k)[grid](*args, **kw)``.

    ``wrap_triton`` lets torch.compile see the kernel inside a ``triton_op``; the interpreter cannot run under it,
    so there the raw kernel is launched (and the op is registered as an opaque ``custom_op``, see
    :func:`vitkernels.ops._library.kernel_op`). Launches are also recorded inside :func:`recording`.
    """
    return _Launcher(kernel)


def tile_names(*names: str):
    """Decorator for a jitted kernel: constexprs other than ``BLOCK_*`` that are tiling choices (recorded as part
    of a launch's configuration)."""

    def decorate(kernel):
        kernel.tile_names = names
        return kernel

    return decorate


def shape_names(*names: str):
    """Decorator for a jitted kernel: ``BLOCK_*`` constexprs fixed by the problem's shape, not chosen by the
    launch-configuration table (not part of a launch's configuration)."""

    def decorate(kernel):
        kernel.shape_names = names
        return kernel

    return decorate

