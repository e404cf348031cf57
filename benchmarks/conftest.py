"""pytest-benchmark conventions shared by every ``benchmarks/bench_<op>.py``.

* ``pytest benchmarks/ --benchmark-only`` runs on the device present: CUDA when available, else CPU (CPU paths).
* One benchmark test per (op, shape, peer). ``benchmark.group`` is ``"<op> | <shape name>"`` so pytest-benchmark
  lists every peer of a shape side by side; ``benchmark.extra_info`` carries ``peer``, ``bytes`` (the op's
  bandwidth floor: what must be read and written at least once), ``flops`` where meaningful, ``device``, and
  ``gbps`` / ``tflops`` computed from the measured median (see :func:`record`).
* A peer that cannot run here (not installed, no CPU kernels, no GPU) is skipped with the reason, never dropped.
"""
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(__file__)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def _ensure_torchvision_importable() -> None:
    """timm imports torchvision; where the real one cannot import (CPU torch), use the tests' import-only stub."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests", "stubs"))


_ensure_torchvision_importable()


def synchronized(fn):
    """``fn`` followed by a device synchronisation, so the timer measures the kernels, not their launch."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def run_benchmark(benchmark, fn, *, peer: str, bytes_moved: int = 0, flops: int = 0, rounds: int = None):
    """Time ``fn`` with pytest-benchmark and record peer, bandwidth floor and throughput in extra_info.

    On CPU the rounds are few (the machine has 2 cores and the suite must finish in minutes); on CUDA
    pytest-benchmark's calibration decides.
    """
    run = synchronized(fn)
    run()  # warm-up: compilation, autotuning, allocator
    benchmark.extra_info.update(peer=peer, device=DEVICE_NAME, bytes=int(bytes_moved), flops=int(flops))
    if DEVICE.type == "cpu":
        result = benchmark.pedantic(run, rounds=rounds or 5, iterations=1, warmup_rounds=1)
    else:
        result = benchmark(run)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        median = stats.stats.median
        if bytes_moved:
            benchmark.extra_info["gbps"] = bytes_moved / median / 1e9
        if flops:
            benchmark.extra_info["tflops"] = flops / median / 1e12
    return result


def timm_or_skip():
    try:
        import timm  # noqa: F401

        return timm
    except Exception as exc:
        pytest.skip(f"timm not importable: {type(exc).__name__}: {exc}")


def compiled_or_skip(fn, **kwargs):
    """``torch.compile(fn)`` where inductor works on this machine, else skip with the reason."""
    try:
        return torch.compile(fn, **kwargs)
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}")


@pytest.fixture
def device():
    return DEVICE
