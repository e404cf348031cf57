"""pytest-benchmark conventions shared by every ``benchmarks/bench_<what>.py``.

Writing a benchmark file (``bench_swin_v2.py``, ``bench_compat.py`` ... follow the same four steps)::

    from conftest import DEVICE, assert_agrees, compiled_or_skip, run_benchmark, skip_auto_if_same, timm_or_skip

    @pytest.mark.parametrize("peer", PEERS)
    def test_thing(benchmark, peer):
        benchmark.group = "thing fwd | shape name"          # 1. one group per (op, mode, shape): peers side by side
        fn = make(peer)                                     #    a peer that cannot run here: pytest.skip(reason)
        assert_agrees(benchmark, fn(x), expected)           # 2. every peer checked against the reference first
        run_benchmark(benchmark, lambda: fn(x), peer=peer,  # 3. timed: median and IQR over rounds
                      bytes_moved=floor, flops=flops)

  4. mark a benchmark that takes minutes on a 2-core CPU (whole-model ``torch.compile`` peers, Swin-B) with
     ``@pytest.mark.heavy``: the quick subset is ``-m "not heavy"``.

What this file provides:

* ``DEVICE``: CUDA when available, else CPU (the CPU paths run there). Peers run on it in its best normal dtype.
* :func:`run_benchmark`: times ``fn`` (CUDA: synchronised; pytest-benchmark calibrates the rounds. CPU: one timed
  warm-up, then as many rounds as fit ``--benchmark-max-time`` seconds, at least ``MIN_CPU_ROUNDS`` and at most
  ``MAX_CPU_ROUNDS``) and records ``peer``, ``bytes`` (the op's bandwidth floor: what must be read and written at
  least once), ``flops``, ``gbps`` / ``tflops`` at the median, in ``extra_info``.
* :func:`assert_agrees`: raises (the benchmark fails, it is not skipped) when a peer's output differs from the
  reference beyond tolerance; records the max abs error in ``extra_info["max_abs_err"]``.
* :func:`skip_auto_if_same`: the ``vitkernels auto`` peer runs only where ``auto`` picks a backend that no named
  peer of the group measures; elsewhere it is skipped with the backend it would have run (no best-of-two over the
  same code).
* Skipped peers are kept with their reasons: in the console (``-rs`` is on by default here) and in the
  ``--benchmark-json`` file under ``"skipped"`` (group, peer, reason), which ``report.py`` shows in tables and plots.
* :func:`linear_floor`: a network's GEMM floor, its ``nn.Linear`` / ``nn.Conv2d`` layers alone at the shapes one
  forward gives them (the whole-model and SwinBlock benchmarks' ``GEMM floor`` rows: the time a peer would take if
  nothing ran outside its GEMMs).
* ``machine_info["vitkernels"]``: device, versions, CPU threads and the allocator mode (see :func:`allocator_mode`);
  in a timed run also ``gemm_peak`` (:func:`measured_gemm_peak`: one large square GEMM's throughput, the scale the
  TFLOP/s columns are read against).
* Console defaults (each overridable on the command line): sorted by median, columns median / iqr / min / max /
  rounds, each row named by its peer (the group heading says the op and shape).
"""
import contextlib
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

_HERE = os.path.dirname(__file__)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
ON_GPU = DEVICE.type == "cuda"
MIN_CPU_ROUNDS = 7
MAX_CPU_ROUNDS = 25
TRITON_ON_CPU = "triton on CPU is the Triton interpreter, a correctness tool: not benchmarked"


def _ensure_torchvision_importable() -> None:
    """timm imports torchvision; where the real one cannot import (CPU torch), use the tests' import-only stub."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests", "stubs"))


_ensure_torchvision_importable()


def allocator_mode() -> str:
    """How host memory is allocated in this process (decided at process start, labelled in every report).

    ``glibc default``: a fresh large tensor is mmap'ed and page-faulted in on first touch, every call. ``caching``:
    jemalloc / tcmalloc preloaded, or glibc told to keep freed memory (``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set), so memory is reused across calls. The same mode applies to every peer."""
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            return f"caching ({lib} preloaded)"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") and os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return (f"caching (glibc, MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} "
                f"MALLOC_TRIM_THRESHOLD_={os.environ['MALLOC_TRIM_THRESHOLD_']})")
    return "glibc default"


# --- console defaults, markers ------------------------------------------------------------------------------------

def _peer_name_formatter(bench):
    """Console row name: the peer (the group heading already names op, mode and shape)."""
    peer = (bench.get("extra_info") or {}).get("peer")
    return peer or bench["name"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy: minutes on a 2-core CPU (whole-model torch.compile peers, Swin-B); "
                   "the quick subset is -m 'not heavy'")
    option = config.option
    SMOKE_RUN[0] = bool(getattr(option, "benchmark_disable", False))
    if not hasattr(option, "benchmark_sort"):
        return  # pytest-benchmark not installed: the plugin's options do not exist
    # pytest-benchmark reads these when its session starts (its pytest_configure runs last): set the defaults here,
    # leaving whatever the command line chose
    if option.benchmark_sort == "min":
        option.benchmark_sort = "median"
    if option.benchmark_columns is None:
        option.benchmark_columns = ["median", "iqr", "min", "max", "rounds"]
    if option.benchmark_name == "normal":
        from pytest_benchmark import utils

        utils.NAME_FORMATTERS.setdefault("peer", _peer_name_formatter)
        option.benchmark_name = "peer"
    if "s" not in option.reportchars and "a" not in option.reportchars and "A" not in option.reportchars:
        option.reportchars += "s"  # skipped peers and why, in the short summary


# --- timing -------------------------------------------------------------------------------------------------------

def synchronized(fn):
    """``fn`` followed by a device synchronisation, so the timer measures the kernels, not their launch."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def run_benchmark(benchmark, fn, *, peer: str, bytes_moved: int = 0, flops: int = 0, rounds: int = None,
                  smoke_checked: bool = False):
    """Time ``fn`` with pytest-benchmark; record peer, bandwidth floor and throughput at the median in extra_info.

    On CPU: one warm-up call, timed, sets the number of rounds to what fits ``--benchmark-max-time`` (default 1 s),
    clamped to [MIN_CPU_ROUNDS, MAX_CPU_ROUNDS] (or ``rounds`` if given), plus one more warm-up round. On CUDA
    pytest-benchmark's calibration decides. The statistics kept are pytest-benchmark's (median, IQR, quartiles ...).
    With ``--benchmark-disable`` (a smoke run): ``fn`` once, nothing timed; not even once with ``smoke_checked``,
    where the caller has just run ``fn`` itself on the same inputs and checked its result.
    """
    run = synchronized(fn)
    benchmark.extra_info.update(peer=peer, device=DEVICE_NAME, bytes=int(bytes_moved), flops=int(flops))
    if getattr(benchmark, "disabled", False):
        if smoke_checked:
            # the whole-model rows: the agreement check ran this step; a second call was a third of their smoke run
            return None
        # a smoke run (--benchmark-disable, CI): pytest-benchmark calls fn once and times nothing, so no warm-up
        # call (it doubled the run's time: a bf16 Swin-T training step takes ~12 s on an AVX2-only CPU)
        return benchmark.pedantic(run, rounds=1, iterations=1)
    start = time.perf_counter()
    run()  # warm-up: compilation, autotuning, allocator
    first = time.perf_counter() - start
    if DEVICE.type == "cpu":
        if rounds is None:
            budget = float(getattr(benchmark, "_max_time", 1.0) or 1.0)
            rounds = min(MAX_CPU_ROUNDS, max(MIN_CPU_ROUNDS, int(budget / max(first, 1e-9))))
        result = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
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


def interleaved_speedup(benchmark, baseline_fn, fn, *, baseline: str, rounds: int) -> dict:
    """Time ``fn`` against ``baseline_fn`` in alternation and record the speedup (baseline time / peer time) in
    ``extra_info["vs_baseline"]``: the median over ``rounds`` pairs and its quartiles.

    Why: pytest-benchmark times each peer in its own stretch of time, and a shared VM's speed drifts by more than a
    peer's quartile range over minutes (a whole-model step measured 30% apart a few minutes later on the 2-core dev
    VM). Timed in alternation, both sides of each pair see the same machine. Pairs alternate their order (baseline
    first, then peer first) so that a steady drift does not favour either side. One warm-up call each first."""
    import statistics

    run_base, run = synchronized(baseline_fn), synchronized(fn)
    run_base()
    run()
    ratios = []
    for i in range(rounds):
        order = (run_base, run) if i % 2 == 0 else (run, run_base)
        times = {}
        for which in order:
            start = time.perf_counter()
            which()
            times[which] = time.perf_counter() - start
        ratios.append(times[run_base] / times[run])
    ratios.sort()
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    result = {"baseline": baseline, "median": statistics.median(ratios), "q1": quartiles[0], "q3": quartiles[2],
              "rounds": rounds}
    benchmark.extra_info["vs_baseline"] = result
    return result


# --- agreement before timing ----------------------------------------------------------------------------------------

def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    if value is None:
        return []
    return [torch.as_tensor(value)]


def default_tolerance(dtype: torch.dtype):
    """(atol, rtol) for a peer's output against a reference computed in higher precision."""
    if dtype in (torch.bfloat16,):
        return 3e-2, 3e-2
    if dtype in (torch.float16,):
        return 5e-3, 5e-3
    return 1e-4, 1e-4


def assert_agrees(benchmark, got, expected, *, atol: float = None, rtol: float = None, rel_norm: float = None,
                  what: str = "output"):
    """Fail (not skip) unless every tensor of ``got`` is close to the matching one of ``expected``.

    ``got`` / ``expected``: tensors or (nested) tuples of tensors in the same order. The comparison is in float64;
    elementwise ``|got - expected| <= atol + rtol * |expected|`` with tolerances defaulting to
    :func:`default_tolerance` of ``got``'s dtype, or, with ``rel_norm``, ``||got - expected|| <= rel_norm *
    ||expected||`` per tensor (whole models: thousands of roundings per element, judged as a whole). Records the max
    abs error in ``benchmark.extra_info["max_abs_err"]`` (the largest over calls).
    """
    got_list, exp_list = _flatten(got), _flatten(expected)
    assert len(got_list) == len(exp_list), f"{what}: {len(got_list)} tensors, expected {len(exp_list)}"
    worst = 0.0
    for i, (g, e) in enumerate(zip(got_list, exp_list)):
        d_atol, d_rtol = default_tolerance(g.dtype)
        a, r = d_atol if atol is None else atol, d_rtol if rtol is None else rtol
        g64, e64 = g.detach().to("cpu", torch.float64), e.detach().to("cpu", torch.float64)
        assert g64.shape == e64.shape, f"{what}[{i}]: shape {tuple(g64.shape)}, expected {tuple(e64.shape)}"
        err = (g64 - e64).abs()
        worst = max(worst, err.max().item() if err.numel() else 0.0)
        if rel_norm is not None:
            ratio = (err.norm() / e64.norm().clamp_min(1e-30)).item()
            if ratio > rel_norm:
                raise AssertionError(
                    f"{what}[{i}] of peer {benchmark.extra_info.get('peer')!r} disagrees with the reference: "
                    f"relative norm error {ratio:.3g} > {rel_norm:g} (max |err| {err.max().item():.3g})")
            continue
        bad = err > a + r * e64.abs()
        if bad.any():
            raise AssertionError(
                f"{what}[{i}] of peer {benchmark.extra_info.get('peer')!r} disagrees with the reference: "
                f"max |err| {err.max().item():.3g} (atol {a:g}, rtol {r:g}), {int(bad.sum())} of {bad.numel()} "
                "elements outside tolerance")
    benchmark.extra_info["max_abs_err"] = max(worst, benchmark.extra_info.get("max_abs_err", 0.0))
    return worst


# --- peers --------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def record_backends():
    """Collect ``(op name, backend)`` for every dispatch made inside the block (eager calls), plus two routes that
    bypass the dispatcher: the fused Swin block / patch merging path (``("swin_block", "native")``, when
    ``_fused_cpu_allowed`` lets it run) and its GEMMs (``("layer_linear", library)``, library ``"onednn"`` or
    ``"aten"``)."""
    from vitkernels import dispatch
    from vitkernels.modules import swin as swin_module
    from vitkernels.ops import linear as linear_op

    chosen = []
    original_select = dispatch.Op.select
    original_allowed = swin_module._fused_cpu_allowed
    original_layer_linear = linear_op.layer_linear

    def select(self, call, backend=None):
        impl = original_select(self, call, backend)
        chosen.append((self.name, impl.backend))
        return impl

    def fused_cpu_allowed(backend, x):
        allowed = original_allowed(backend, x)
        if allowed:
            chosen.append(("swin_block", "native"))
        return allowed

    def layer_linear(x, weight, bias=None):
        route = linear_op.layer_linear_route(x, weight, bias)
        if route != "dispatch":  # otherwise layer_linear goes through linear(), whose select records itself
            chosen.append(("layer_linear", route))
        return original_layer_linear(x, weight, bias)

    dispatch.Op.select = select
    swin_module._fused_cpu_allowed = fused_cpu_allowed
    linear_op.layer_linear = layer_linear
    try:
        yield chosen
    finally:
        dispatch.Op.select = original_select
        swin_module._fused_cpu_allowed = original_allowed
        linear_op.layer_linear = original_layer_linear


def skip_auto_if_same(run_once, named_backends=("native", "triton")):
    """Skip the ``vitkernels auto`` peer when ``auto`` runs one backend that a named peer of the group measures.

    ``run_once``: calls the auto peer once (eagerly); the backends it dispatched to are recorded. Where auto picks
    the same code as ``vitkernels native`` (CPU) or ``vitkernels triton`` (CUDA), timing it again would only add a
    best-of-two over noise. The fused Swin path's GEMMs (``layer_linear``) do not count: they run the machine's CPU
    GEMM library whatever backend the block is pinned to, so the named peer runs them too. Returns the backends auto
    used (when it is not skipped: a mix, or a backend no named peer runs).
    """
    with record_backends() as chosen:
        run_once()
    picked = sorted({backend for op_name, backend in chosen if op_name != "layer_linear"})
    if len(picked) == 1 and picked[0] in named_backends:
        pytest.skip(f"auto runs '{picked[0]}' here: the same code as the 'vitkernels {picked[0]}' peer "
                    "(not timed twice)")
    return picked


def peak_memory_mib(fn):
    """Peak memory allocated by one call of ``fn`` above what was allocated before it, in MiB (CUDA only)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _import_timm():
    """(timm, None), or (None, the exception) where timm does not import here."""
    try:
        import timm

        return timm, None
    except Exception as exc:
        return None, exc


def timm_or_none():
    """timm, or None: for what runs without it (a peer's optional comparison with timm)."""
    return _import_timm()[0]


def timm_or_skip():
    timm, exc = _import_timm()
    if timm is None:
        pytest.skip(f"timm not importable: {type(exc).__name__}: {exc}")
    return timm


def padded_for_flex(t: torch.Tensor, dims) -> torch.Tensor:
    """``t`` zero-padded along ``dims`` to a multiple of 128: a tensor a flex_attention ``score_mod`` indexes with
    ``q_idx`` / ``kv_idx``. flex_attention's kernels evaluate ``score_mod`` on the padded lanes of their last tile
    too (a window's 49 tokens fill part of a 64 / 128 tile), before masking them, so a capture sized to the sequence
    is read out of bounds there (pytorch/pytorch#150321); padded, every read is in bounds and the padded lanes'
    scores are discarded as before."""
    pad = []
    for d in range(t.dim() - 1, -1, -1):
        extra = (-t.shape[d]) % 128 if d in dims else 0
        pad += [0, extra]
    return F.pad(t, pad)


# True in a smoke run (--benchmark-disable: each benchmark once, nothing timed; set by pytest_configure)
SMOKE_RUN = [False]


def compiled_or_skip(fn, *, ours: bool = False, **kwargs):
    """``torch.compile(fn)`` where inductor works on this machine, else skip with the reason.

    In a smoke run a peer that compiles other code than vitkernels' (``ours`` False: timm's, the references, the
    official losses, ``flex_attention``) gets the ``aot_eager`` backend: Dynamo and AOTAutograd trace it as for
    inductor and its output is still checked against the reference, but Inductor's code generation (20-55 s per
    peer on a 2-core CPU with a cold cache, half of the smoke run) is left to the timed runs. A peer compiling the
    vitkernels-patched model (``ours``) keeps inductor there too."""
    if SMOKE_RUN[0] and not ours and "backend" not in kwargs:
        kwargs["backend"] = "aot_eager"
    try:
        return torch.compile(fn, **kwargs)
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}")


@pytest.fixture
def device():
    return DEVICE


# --- GEMM floors and the machine's GEMM peak ------------------------------------------------------------------------

def linear_floor(net, forward, train, linear=None, amp_dtype=None):
    """The GEMM floor of ``net``: every ``nn.Linear`` / ``nn.Conv2d`` of it alone, at the input shapes one call of
    ``forward()`` gives them (captured by forward hooks, under no_grad), on random inputs; forward and, with
    ``train``, the backward to their inputs and weights; nothing else (no attention, norm, activation, copy). The
    Linears run ``linear(x, weight, bias)`` (default ``F.linear``; the patched models' :func:`vitkernels.linear`),
    the convolutions the module itself; under ``amp_dtype`` autocast if given. A net whose own forward skips its
    Linear modules' ``forward`` (vitkernels.SwinBlock runs their weights as GEMMs) has nothing captured: capture
    from a module of the same shapes that calls them (the reference block).

    Returns (floor, flops): ``floor()`` runs the layers once (and their backward); ``flops`` counts 2 per
    multiply-accumulate, x 3 with ``train`` (the input and the weight gradient)."""
    linear = linear or F.linear
    layers = []

    def hook(module, inputs, output):
        layers.append((module, torch.randn_like(inputs[0]), torch.randn_like(output)))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    for _, x, _ in layers:
        x.requires_grad_(train)
    macs = sum(g.numel() * (m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()) for m, _, g in layers)

    def gemm(module, x):
        return linear(x, module.weight, module.bias) if isinstance(module, nn.Linear) else module(x)

    def floor():
        with torch.set_grad_enabled(train), torch.autocast(DEVICE.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outs = [gemm(module, x) for module, x, _ in layers]
            if train:
                torch.autograd.backward(outs, [g.to(o.dtype) for o, (_, _, g) in zip(outs, layers)])
        return outs

    return floor, 2 * macs * (3 if train else 1)


def measured_gemm_peak(repeats: int = 5) -> dict:
    """One large square GEMM's throughput on DEVICE, the scale the TFLOP/s columns are read against: on CPU float32
    2048 x 2048 x 2048 ``torch.mm`` on the benchmarks' threads (MKL / oneDNN near the cores' FMA peak: a floor row at
    that rate leaves nothing to win inside its GEMMs), on CUDA bfloat16 8192^3. Median of ``repeats`` calls after one
    warm-up, into a preallocated output."""
    n, dtype = (8192, torch.bfloat16) if ON_GPU else (2048, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    out = torch.empty(n, n, device=DEVICE, dtype=dtype)
    run = synchronized(lambda: torch.mm(a, b, out=out))
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return {"tflops": 2 * n ** 3 / median / 1e12,
            "what": f"{str(dtype).replace('torch.', '')} {n}x{n}x{n} torch.mm, median of {repeats}"}


# --- recording: versions, allocator, skipped peers ----------------------------------------------------------------

_SKIPPED = []


def pytest_benchmark_update_machine_info(config, machine_info):
    import platform

    info = {
        "device": DEVICE_NAME,
        "device_type": DEVICE.type,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "allocator": allocator_mode() if DEVICE.type == "cpu" else "torch CUDA caching allocator",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    timm = timm_or_none()
    info["timm"] = timm.__version__ if timm is not None else None
    session = getattr(config, "_benchmarksession", None)
    if session is not None and not session.disabled:  # a timed run (a smoke run, --benchmark-disable, times nothing)
        info["gemm_peak"] = measured_gemm_peak()
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
