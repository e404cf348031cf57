"""Where a whole model's step goes, unpatched vs patched by vitkernels: launch-bound or kernel-bound, and which ops.

For each model and mode of ``benchmarks/bench_models.py`` (the same models, batches, inputs, bf16 autocast on a GPU
and the same one-call patch), both the unpatched model and the patched one run ``--warmup`` steps, then ``--steps``
steps under ``torch.profiler`` (CPU and, on a GPU, CUDA activities). Per model, mode and peer it reports

* the wall time per step (synchronised) and, on a GPU, the time the device spent in kernels per step: a device
  busy for much less than the wall time is waiting on the host (a launch-bound step, where per-op Python and
  dispatch cost is what counts), one busy for about all of it is bound by its kernels;
* the ops with the largest self device time (GPU) or self CPU time (CPU), per step, side by side for the two
  peers, and the ops with the largest self CPU time (the host's share).

Written for the GPU check (``.ci/gpu profile``): the first H200 run found the patched DeiT-S and MAE slower than
timm in training without saying why. Run from the repository root:

    python benchmarks/profile_models.py --models deit_small mae_vit_base --modes train --out profile.md

On a machine without a GPU it runs the CPU batch sizes of bench_models (a dry run of the script, not numbers).
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # noqa: E402  (its models, patch, inputs and step: the benchmark's own)
from conftest import DEVICE  # noqa: E402

ON_GPU = DEVICE.type == "cuda"


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _step_of(model: str, mode: str, patched: bool):
    """The benchmark's timed call for ``model`` / ``mode``, on a fresh copy of the unpatched or patched model."""
    name, gpu_batches, cpu_batches, _ = bench_models.MODELS[model]
    batch = (gpu_batches if ON_GPU else cpu_batches)[mode]
    net = copy.deepcopy(bench_models._base_model(model))
    if patched:
        net = bench_models._patched(model, net)
    net.train(mode == "train")
    params = [p for p in net.parameters() if p.requires_grad]
    step = bench_models._step(model, mode, net, params)
    imgs, extra = bench_models._inputs(model, mode, batch)
    return (lambda: step(imgs, extra)), batch


def _self_times(prof, steps: int):
    """Per op name: (self device us, self CPU us) per step."""
    device, host = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        device[event.key] += getattr(event, "self_device_time_total", 0.0) / steps
        host[event.key] += event.self_cpu_time_total / steps
    return device, host


def profile_peer(model: str, mode: str, patched: bool, warmup: int, steps: int):
    run, batch = _step_of(model, mode, patched)
    for _ in range(warmup):
        run()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    _sync()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        _sync()
    device, host = _self_times(prof, steps)
    return dict(batch=batch, wall_ms=wall_ms, device=device, host=host)


def _top(counter, n):
    return [(k, v) for k, v in counter.most_common(n) if v > 0]


def report(model: str, mode: str, results, top: int) -> str:
    lines = [f"### {model} {mode} (batch {results['timm'].get('batch')}, {'bf16 autocast' if ON_GPU else 'fp32'})", ""]
    lines.append("| peer | wall / step | device busy / step | busy share | host self CPU / step |")
    lines.append("|---|---:|---:|---:|---:|")
    for peer, r in results.items():
        busy = sum(r["device"].values()) / 1e3
        host = sum(r["host"].values()) / 1e3
        share = f"{busy / r['wall_ms']:.0%}" if ON_GPU and r["wall_ms"] else "-"
        lines.append(f"| {peer} | {r['wall_ms']:.2f} ms | {busy:.2f} ms | {share} | {host:.2f} ms |")
    lines.append("")
    key = "device" if ON_GPU else "host"
    what = "self device time" if ON_GPU else "self CPU time"
    for k in ([key, "host"] if ON_GPU else [key]):
        label = what if k == key else "self CPU time (the host)"
        lines.append(f"Largest {label} per step, ms (each peer's top {top}):")
        lines.append("")
        names = []
        for r in results.values():
            names += [n for n, _ in _top(r[k], top) if n not in names]
        lines.append("| op | " + " | ".join(results) + " |")
        lines.append("|---|" + "---:|" * len(results))
        for n in names:
            cells = " | ".join(f"{r[k].get(n, 0.0) / 1e3:.3f}" for r in results.values())
            lines.append(f"| `{n[:90]}` | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_small", "mae_vit_base", "swin_tiny"],
                        choices=sorted(bench_models.MODELS))
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None, help="also write the Markdown here (rewritten after each case)")
    args = parser.parse_args(argv)
    device_name = torch.cuda.get_device_name() if ON_GPU else "CPU"
    parts = [f"# Model step profiles: timm vs patched ({device_name}, torch {torch.__version__})", ""]
    for model in args.models:
        for mode in args.modes:
            if mode not in bench_models.MODELS[model][1]:
                continue  # MAE has no inference case
            results = {}
            for patched in (False, True):
                peer = "patched" if patched else "timm"
                try:
                    results[peer] = profile_peer(model, mode, patched, args.warmup, args.steps)
                except Exception as exc:  # report and go on: the other cases still say something
                    parts += [f"### {model} {mode}: {peer} failed: {type(exc).__name__}: {exc}"[:400], ""]
                    break
            if len(results) == 2:
                parts.append(report(model, mode, results, args.top))
            text = "\n".join(parts)
            print(text.split("\n### ")[-1] if "### " in text else text, flush=True)
            if args.out:
                with open(args.out + ".tmp", "w") as f:
                    f.write(text + "\n")
                os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
