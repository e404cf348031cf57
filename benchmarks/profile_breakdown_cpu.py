"""Where a whole Swin-T's CPU time goes: GEMMs vs everything else, timm vs timm patched by vitkernels.

For each model (timm ``swin_tiny_patch4_window7_224``, ``pretrained=False``, and the same model after
``vitkernels.compat.timm.patch_model``) and mode (``inference``: eval + no_grad; ``train``: forward, ``sum()``
loss, backward to every parameter, SGD step), the step runs under ``torch.profiler`` ``--steps`` times. Each op's
self CPU time is taken per step and its *minimum over the steps* kept: on a shared machine interference only adds
time, so the minimum is the closest to the op's own cost. Ops are then split into

* GEMM: ``aten::mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` / the convolution kernels (the Linears, the patch-embed conv,
  and timm's attention matmuls);
* everything else: attention (the fused op, or timm's softmax + copies), norms, activations, residual adds, copies,
  the optimizer, the framework's own ops.

The table gives the GEMM share of the summed self time, and the largest non-GEMM ops. Run from the repository root:

    python benchmarks/profile_breakdown_cpu.py --threads 2 --batch 4 --out benchmarks/results/cpu_breakdown.md

(a few minutes on 2 cores). Timings on a machine shared with other work are distorted (memory-bound ops most);
the per-op minimum limits that but does not remove it: read the shares from a quiet machine.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (makes timm importable on a CPU-only torch: the tests' torchvision stub)

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
            "aten::convolution_backward", "aten::_convolution"}


def build(which: str):
    import timm

    from vitkernels.compat.timm import patch_model

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    return patch_model(model) if which == "patched" else model


def step_fn(model, mode: str, x: torch.Tensor):
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x).sum().backward()
            opt.step()
    return step


def per_op_minimum(step, steps: int):
    """op name -> the minimum over ``steps`` profiled steps of its self CPU time in one step (ms); and the
    minimum wall time of a step (ms, profiled)."""
    best = collections.defaultdict(lambda: float("inf"))
    wall = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall = min(wall, (time.perf_counter() - t0) * 1e3)
        totals = collections.Counter()
        for event in prof.key_averages():
            totals[event.key] += event.self_cpu_time_total / 1e3
        for name, ms in totals.items():
            best[name] = min(best[name], ms)
    return dict(best), wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="profiled steps per model and mode (after 2 warm-ups)")
    parser.add_argument("--modes", default="inference,train")
    parser.add_argument("--top", type=int, default=8, help="non-GEMM ops listed per model and mode")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224)
    lines = [f"# Swin-T CPU time breakdown: GEMMs vs the rest (batch {args.batch}, {args.threads} threads, "
             f"per-op minimum over {args.steps} steps)", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPUs visible; self time per op, summed.", ""]
    for mode in args.modes.split(","):
        lines += [f"## {mode}", "", "| model | step (min, profiled) | self time | GEMM | rest | GEMM share | largest "
                  "non-GEMM ops (ms) |", "|---|---:|---:|---:|---:|---:|---|"]
        for which in ("timm", "patched"):
            step = step_fn(build(which), mode, x)
            step()
            step()
            ops, wall = per_op_minimum(step, args.steps)
            gemm = sum(ms for name, ms in ops.items() if name in GEMM_OPS)
            total = sum(ops.values())
            rest = sorted(((ms, name) for name, ms in ops.items() if name not in GEMM_OPS), reverse=True)[:args.top]
            listed = ", ".join(f"{name.replace('aten::', '').replace('vitkernels::', 'vk::')} {ms:.1f}"
                               for ms, name in rest)
            lines.append(f"| {which} | {wall:.1f} ms | {total:.1f} ms | {gemm:.1f} ms | {total - gemm:.1f} ms | "
                         f"{100 * gemm / total:.0f}% | {listed} |")
            print(lines[-1], flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
