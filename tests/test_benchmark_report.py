"""benchmarks/report.py's run header: the CPU line names the x86 family / model (a VM's brand string alone does not
tell a Zen 4 from a Zen 5 EPYC, and the CPU results depend on it)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import report  # noqa: E402


def _run(cpu):
    return {"machine_info": {"cpu": cpu, "vitkernels": {"device_type": "cpu", "cpu_threads": 2,
                                                        "allocator": "glibc default", "torch": "2.13.0+cpu"}},
            "commit_info": {"id": "0123456789abcdef", "dirty": False}, "datetime": "2026-12-03T03:00:00+00:00"}


def test_cpu_label_names_family_model_and_simd():
    zen4 = {"brand_raw": "AMD EPYC", "family": 25, "model": 17, "flags": ["avx2", "avx512f", "fma"]}
    zen5 = {"brand_raw": "AMD EPYC", "family": 26, "model": 2, "flags": ["avx2", "avx512f"]}
    assert report.cpu_label(zen4) == "AMD EPYC, x86 family 25 model 17, AVX-512"
    assert report.cpu_label(zen5) == "AMD EPYC, x86 family 26 model 2, AVX-512"
    assert report.cpu_label({"brand_raw": "Some CPU", "family": 6, "model": 85, "flags": ["avx2"]}) == \
        "Some CPU, x86 family 6 model 85, AVX2"


def test_cpu_label_without_family_is_the_brand():
    assert report.cpu_label({"brand_raw": "AMD EPYC"}) == "AMD EPYC"
    assert report.cpu_label({}) == "unknown"


def test_header_carries_the_cpu_label_and_commit():
    text = report.header(_run({"brand_raw": "AMD EPYC", "family": 25, "model": 17, "flags": ["avx512f"]}))
    assert text.startswith("device: CPU (AMD EPYC, x86 family 25 model 17, AVX-512, 2 threads); "
                           "allocator: glibc default")
    assert "commit 0123456789;" in text


def test_header_names_the_measured_gemm_peak_where_the_run_took_it():
    data = _run({"brand_raw": "AMD EPYC"})
    assert "GEMM peak" not in report.header(data)  # a run without it (older results, smoke runs)
    data["machine_info"]["vitkernels"]["gemm_peak"] = {"tflops": 0.1274, "what": "float32 2048x2048x2048 torch.mm"}
    assert report.header(data).endswith("; GEMM peak 0.127 TFLOP/s (float32 2048x2048x2048 torch.mm)")


def test_group_table_adds_the_interleaved_speedup_column_where_a_benchmark_took_it():
    rows = [
        {"peer": "timm eager", "median": 0.3, "q1": 0.29, "q3": 0.31, "rounds": 7},
        {"peer": "patched eager", "median": 0.2, "q1": 0.19, "q3": 0.21, "rounds": 7,
         "vs_baseline": {"baseline": "timm eager", "median": 1.4, "q1": 1.3, "q3": 1.5, "rounds": 6}},
        {"peer": "other", "median": None, "reason": "not here"},
    ]
    lines = report.group_table("model x | y", rows)
    assert "speedup, interleaved (p25-p75)" in lines[2]
    widths = {line.count("|") for line in lines[2:] if line.startswith("|")}
    assert widths == {10}, lines  # header, rule, two measured rows and the skipped one: 9 columns each
    assert "| 1.50x (1.38-1.63) | 1.40x (1.30-1.50) |" in next(line for line in lines if "patched eager" in line)
    assert "| 1.00x (0.94-1.07) | 1.00x |" in next(line for line in lines if line.startswith("| timm eager"))
    # without any interleaved measurement the table keeps its 8 columns
    plain = report.group_table("op | shape", [rows[0], rows[2]])
    assert "interleaved" not in plain[2] and {line.count("|") for line in plain[2:] if line.startswith("|")} == {9}


def _benchmarks_module(name):
    """benchmarks/<name>.py loaded by path under a private name (benchmarks/conftest.py would clash with
    tests/conftest.py as a plain ``import conftest``)."""
    import importlib.util

    path = os.path.join(os.path.dirname(report.__file__), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"vitkernels_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_speedup_alternates_and_records_the_ratio():
    bench_conftest = _benchmarks_module("conftest")
    calls = []

    class FakeBenchmark:
        extra_info = {}

    clock = [0.0]

    def advance(seconds, name):
        def fn():
            calls.append(name)
            clock[0] += seconds
        return fn

    real = bench_conftest.time.perf_counter
    bench_conftest.time.perf_counter = lambda: clock[0]
    try:
        result = bench_conftest.interleaved_speedup(FakeBenchmark, advance(3.0, "base"), advance(2.0, "peer"),
                                                    baseline="timm eager", rounds=4)
    finally:
        bench_conftest.time.perf_counter = real
    # one warm-up each, then pairs in alternating order
    assert calls == ["base", "peer", "base", "peer", "peer", "base", "base", "peer", "peer", "base"]
    assert result == FakeBenchmark.extra_info["vs_baseline"]
    assert result["baseline"] == "timm eager" and result["rounds"] == 4
    assert abs(result["median"] - 1.5) < 1e-12 and abs(result["q1"] - 1.5) < 1e-12 and abs(result["q3"] - 1.5) < 1e-12


def test_smoke_run_calls_fn_once_or_not_at_all_when_the_caller_checked_it(monkeypatch):
    """--benchmark-disable (CI's smoke run): run_benchmark calls fn once, untimed; with smoke_checked (the model rows,
    whose agreement check has just run the same step) not at all. A timed run (its CPU branch) calls it regardless."""
    import torch

    bench_conftest = _benchmarks_module("conftest")
    monkeypatch.setattr(bench_conftest, "DEVICE", torch.device("cpu"))

    class FakeBenchmark:
        def __init__(self, disabled):
            self.disabled, self.extra_info, self.rounds = disabled, {}, []

        def pedantic(self, fn, rounds, iterations, warmup_rounds=0):
            self.rounds.append(rounds)
            for _ in range(warmup_rounds + rounds * iterations):
                fn()

    calls = []
    smoke = FakeBenchmark(disabled=True)
    bench_conftest.run_benchmark(smoke, lambda: calls.append("smoke"), peer="p")
    assert calls == ["smoke"] and smoke.rounds == [1]
    bench_conftest.run_benchmark(smoke, lambda: calls.append("checked"), peer="p", smoke_checked=True)
    assert calls == ["smoke"] and smoke.extra_info["peer"] == "p"
    timed = FakeBenchmark(disabled=False)
    bench_conftest.run_benchmark(timed, lambda: calls.append("timed"), peer="p", rounds=3, smoke_checked=True)
    assert calls.count("timed") == 1 + 1 + 3  # the warm-up call, pedantic's warm-up round, three rounds


def _settle(tmp_path, monkeypatch, porcelain):
    import json
    import subprocess

    publish = _benchmarks_module("publish")
    out = os.path.join(publish.ROOT, "benchmarks", "results")
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"commit_info": {"id": "abc", "dirty": True}}))
    monkeypatch.setattr(publish.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=porcelain, stderr=""))
    publish.settle_dirty_flag(str(path), out)
    return json.loads(path.read_text())["commit_info"]


def test_publish_clears_dirty_when_only_earlier_results_differ(tmp_path, monkeypatch):
    info = _settle(tmp_path, monkeypatch, " M benchmarks/results/cpu-glibc.json\n?? benchmarks/results/x.png\n")
    assert info["dirty"] is False and info["dirty_results_only"] is True


def test_publish_keeps_dirty_and_names_changed_code(tmp_path, monkeypatch):
    info = _settle(tmp_path, monkeypatch, " M benchmarks/results/cpu-glibc.json\n M vitkernels/ops/linear.py\n")
    assert info["dirty"] is True and info["dirty_paths"] == ["vitkernels/ops/linear.py"]


def test_auto_swin_block_counts_as_the_native_peer(monkeypatch):
    """The benchmarks' ``skip_auto_if_same``: on CPU the ``auto`` SwinBlock runs the fused native path (recorded as
    such), whose GEMMs call the machine's CPU GEMM library directly (layer_linear, no backend selection, the same for
    every pinned backend): so the 'vitkernels auto' peer is skipped as the same code as 'vitkernels native', not
    timed twice, with either GEMM library; the patched functions are restored afterwards."""
    import importlib.util

    import pytest
    import torch

    import vitkernels
    from vitkernels.modules import swin as swin_module
    from vitkernels.ops import linear as linear_op

    if linear_op._layer_fast_path is None:
        pytest.skip("vitkernels._C is not built")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "conftest.py")
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    block = vitkernels.SwinBlock(32, (14, 14), 2, window_size=7, shift_size=3)
    x = torch.randn(1, 14, 14, 32)
    originals = (vitkernels.dispatch.Op.select, swin_module._fused_cpu_allowed, linear_op.layer_linear)
    for library in ("onednn", "aten"):
        monkeypatch.setattr(linear_op, "CPU_GEMM", library)
        with bench.record_backends() as chosen:
            block(x)
        assert ("swin_block", "native") in chosen
        assert {entry for entry in chosen if entry[0] == "layer_linear"} == {("layer_linear", library)}
        with pytest.raises(pytest.skip.Exception, match="same code"):
            bench.skip_auto_if_same(lambda: block(x))
    assert (vitkernels.dispatch.Op.select, swin_module._fused_cpu_allowed, linear_op.layer_linear) == originals


def test_linear_floor_replays_each_linear_and_conv_at_its_captured_shape_with_its_flops():
    import torch
    from torch import nn

    bench_conftest = _benchmarks_module("conftest")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), nn.Identity())
    head = nn.Linear(8, 5)
    x = torch.randn(2, 3, 8, 8)

    def forward():
        return head(net(x).transpose(1, 2))  # (2, 4, 8) tokens into the Linear

    seen = []

    def linear(inp, weight, bias):
        seen.append(tuple(inp.shape))
        return torch.nn.functional.linear(inp, weight, bias)

    container = nn.ModuleList([net, head])
    floor, flops = bench_conftest.linear_floor(container, forward, train=False, linear=linear)
    conv_macs = 2 * 8 * 2 * 2 * (3 * 4 * 4)  # output elements x (in channels x kernel)
    linear_macs = 2 * 4 * 5 * 8
    assert flops == 2 * (conv_macs + linear_macs)
    outs = floor()
    assert seen == [(2, 4, 8)] and [tuple(o.shape) for o in outs] == [(2, 8, 2, 2), (2, 4, 5)]
    head.weight.grad = None
    train_floor, train_flops = bench_conftest.linear_floor(container, forward, train=True, linear=linear)
    assert train_flops == 3 * flops
    train_floor()
    assert head.weight.grad is not None and net[0].weight.grad is not None  # the backward to the weights ran


def test_measured_gemm_peak_is_a_positive_rate_with_what_it_timed():
    bench_conftest = _benchmarks_module("conftest")
    peak = bench_conftest.measured_gemm_peak(repeats=1)
    assert peak["tflops"] > 0 and "torch.mm" in peak["what"]
