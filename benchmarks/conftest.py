"""pytest-benchmark conventions shared by every ``benchmarks/bench_<op>.py``.

* ``pytest benchmarks/ --benchmark-only`` runs on the device present: CUDA when available, else CPU (CPU paths).
* One benchmark test per (op, shape, peer). ``benchmark.group`` is ``"<op> | <shape name>"`` so pytest-benchmark
  lists every peer of a shape side by side; ``benchmark.extra_info`` carries ``peer``, ``bytes`` (the op's
  bandwidth floor: what must be read and written at least once), ``flops`` where meaningful, ``device``, and
  ``gbps`` / ``tflops`` computed from the measured median (see :func:`record`).
* A peer that cannot run here (not installed, no CPU kernels, no GPU) is skipped with the reason, never dropped:
  skipped benchmarks are written into the ``--benchmark-json`` file under ``"skipped"`` (group, peer, reason), and
  ``machine_info["vitkernels"]`` records the device, versions and the device's measured copy bandwidth, so
  ``benchmarks/report.py`` can show every peer and the fraction of the bandwidth floor achieved.
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

    On CPU a fixed 15 rounds after 2 warm-ups (the whole CPU suite takes about two minutes on 2 cores; a shared
    machine is noisy, so the median of 15 is quoted); on CUDA pytest-benchmark's calibration decides.
    """
    run = synchronized(fn)
    run()  # warm-up: compilation, autotuning, allocator
    benchmark.extra_info.update(peer=peer, device=DEVICE_NAME, bytes=int(bytes_moved), flops=int(flops))
    if DEVICE.type == "cpu":
        result = benchmark.pedantic(run, rounds=rounds or 15, iterations=1, warmup_rounds=2)
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


def peak_memory_mib(fn):
    """Peak memory allocated by one call of ``fn`` above what was allocated before it, in MiB (CUDA only)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


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


# --- recording: device copy bandwidth, versions, skipped peers ----------------------------------------------------

_SKIPPED = []
_COPY_GBPS = None


def copy_bandwidth_gbps() -> float:
    """The device's achievable memory bandwidth, measured as a large tensor copy (read + write), in GB/s.

    The "% of bandwidth floor" in reports is an op's bytes-at-least-once / time, divided by this.
    """
    global _COPY_GBPS
    if _COPY_GBPS is None:
        import time

        n = (256 if DEVICE.type == "cuda" else 64) * 2**20 // 4
        src = torch.randn(n, device=DEVICE)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(5):
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        _COPY_GBPS = 2 * n * 4 / best / 1e9
    return _COPY_GBPS


def pytest_benchmark_update_machine_info(config, machine_info):
    import platform

    info = {
        "device": DEVICE_NAME,
        "device_type": DEVICE.type,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "copy_gbps": round(copy_bandwidth_gbps(), 1),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    machine_info["vitkernels"] = info


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "benchmark" in getattr(item, "funcargs", {}):
        bench = item.funcargs["benchmark"]
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({
            "nodeid": item.nodeid,
            "group": getattr(bench, "group", None),
            "peer": _peer_name(item, bench),
            "reason": reason.replace("Skipped: ", "", 1),
        })


def _peer_name(item, bench):
    """The skipped peer's name: extra_info["peer"] if the test set it, else its "peer" parameter, else the test id."""
    peer = getattr(bench, "extra_info", {}).get("peer")
    callspec = getattr(item, "callspec", None)
    if peer is None and callspec is not None:
        peer = callspec.params.get("peer")
        peer = peer if isinstance(peer, str) else callspec.id
    return peer


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)
