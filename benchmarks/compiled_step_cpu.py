"""A whole timm model's CPU step against ``torch.compile``: timm eager, ``torch.compile(timm)``, timm patched by
vitkernels (eager) and ``torch.compile(patched)``, timed in turn, with each peer's speedup over timm eager and over
``torch.compile(timm)`` as paired ratios (each round's step times divided; median and p25-p75 over the rounds).

The benchmark suite's whole-model rows (``bench_models.py``) give every peer's median and its ratio to timm eager
timed in alternation; this script pairs every peer with ``torch.compile(timm)`` too, at the issue's batch 4, which
the suite's CPU training rows (batch 2) do not run. Random weights (``pretrained=False``); ``train``: train mode,
gradients set to None, forward, a squared-output loss, backward; ``inference``: eval mode under no_grad. Compiling
takes minutes on 2 cores (the first round is after two warm-up steps of each peer). Run from the repository root:

    python benchmarks/compiled_step_cpu.py --mode train --batch 4 --rounds 12 --allocator glibc \\
        --out benchmarks/results/zen3-compiled-step/train-b4-glibc.md
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402  (makes timm importable on a CPU-only torch: the tests' torchvision stub)
from profile_breakdown_cpu import cpu_label, interleaved, rerun_under_allocator  # noqa: E402
from vitkernels.compat.timm import patch_model  # noqa: E402


def step_of(model: torch.nn.Module, run, mode: str, x: torch.Tensor):
    """One step of ``run`` (the model or its compiled form) on ``x``: see the module docstring."""
    if mode == "inference":
        def step():
            with torch.no_grad():
                run(x)
        return step

    def step():
        for p in model.parameters():
            p.grad = None
        run(x).square().mean().backward()
    return step


def paired(times, num: str, den: str) -> str:
    """``num``'s times over ``den``'s, round by round: median (p25-p75)."""
    ratios = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.3f}x ({q[0]:.3f}-{q[2]:.3f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--mode", choices=("train", "inference"), default="train")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="also write the markdown here")
    parser.add_argument("--allocator", choices=("inherit", "glibc", "caching"), default="inherit",
                        help="run under glibc's default allocator or the benchmarks' glibc caching settings "
                             "(default: the allocator this process was started with)")
    args = parser.parse_args(argv)
    if args.allocator != "inherit":
        return rerun_under_allocator(args.allocator, __file__, argv)
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timm_model = timm.create_model(args.model, pretrained=False)
    patched = patch_model(copy.deepcopy(timm_model))
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():  # the patched model computes timm's numbers (the suite checks every peer; this once)
        torch.testing.assert_close(patched.eval()(x), timm_model.eval()(x), rtol=1e-3, atol=1e-3)
    for model in (timm_model, patched):
        model.train(args.mode == "train")
    steps = {
        "timm eager": step_of(timm_model, timm_model, args.mode, x),
        "timm torch.compile": step_of(timm_model, torch.compile(timm_model), args.mode, x),
        "patched eager": step_of(patched, patched, args.mode, x),
        "patched torch.compile": step_of(patched, torch.compile(patched), args.mode, x),
    }
    for step in steps.values():  # compiles, then one more warm-up in interleaved()
        step()
    times = interleaved(steps, args.rounds)
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    lines = [f"# {args.model} {args.mode} step, batch {args.batch}: eager and torch.compile, paired", "",
             f"{cpu_label()}, {args.threads} threads; torch {torch.__version__}, timm {timm.__version__}; allocator: "
             f"{conftest.allocator_mode()}; commit {commit}; "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}; {args.rounds} rounds, the peers in turn",
             "", "| peer | median step | speedup vs timm eager | speedup vs torch.compile(timm) |",
             "|---|---:|---:|---:|"]
    for name in steps:
        lines.append(f"| {name} | {statistics.median(times[name]):.1f} ms | {paired(times, 'timm eager', name)} | "
                     f"{paired(times, 'timm torch.compile', name)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
