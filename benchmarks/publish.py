"""Regenerate the published benchmark numbers: JSON, Markdown tables, plots and the README's benchmark section.

    python benchmarks/publish.py [--quick] [--max-time SECONDS] [--out benchmarks/results] [--no-readme]
                                 [--jemalloc /path/to/libjemalloc.so.2] [--runs cpu-glibc] [-- extra pytest arguments]

Run it on a quiet machine: timings taken while other work shares the cores are not comparable. It runs the
benchmark suite (``pytest benchmarks/ --benchmark-only``; ``--quick`` adds ``-m "not heavy"``) once per allocator
mode, each in a fresh process whose environment is set before Python starts:

* CPU: ``glibc default``, then ``caching`` (glibc told to keep freed memory: ``MALLOC_MMAP_THRESHOLD_`` /
  ``MALLOC_TRIM_THRESHOLD_``; or jemalloc with ``--jemalloc PATH``), the same mode for every peer of a run;
* CUDA: once (torch's CUDA caching allocator).

Each run writes ``<out>/<device>-<mode>.json``; then ``report.py`` writes their Markdown tables and plots into
``<out>`` and the README section between the ``benchmarks`` markers, each run headed by its device, versions,
allocator, commit and date. Prints the wall time of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_CACHING = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def _device() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def runs_for(device: str, jemalloc: Optional[str]):
    """(name, environment changes) of each run: allocator variables removed, then the mode's set."""
    if device == "cuda":
        return [("cuda", {})]
    caching = {"LD_PRELOAD": jemalloc} if jemalloc else dict(GLIBC_CACHING)
    return [("cpu-glibc", {}), ("cpu-caching", caching)]


def settle_dirty_flag(path: str, out_dir: str) -> None:
    """pytest-benchmark marks a run ``dirty`` when the work tree differs from the commit, and from the second run on
    the earlier runs' result files in ``out_dir`` always do. Where those are the only differences, the run measured
    the committed code: ``dirty`` is set back to False and ``dirty_results_only`` records why. Otherwise the changed
    paths outside ``out_dir`` are listed in ``dirty_paths`` (the report keeps "(dirty)")."""
    with open(path) as f:
        data = json.load(f)
    commit = data.get("commit_info", {})
    if not commit.get("dirty"):
        return
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                            capture_output=True, text=True)
    if status.returncode != 0:
        return
    results = os.path.relpath(os.path.abspath(out_dir), ROOT).replace(os.sep, "/").rstrip("/") + "/"
    changed = [line[3:].split(" -> ")[-1].strip('"') for line in status.stdout.splitlines() if line.strip()]
    others = [p for p in changed if not p.startswith(results)]
    if others:
        commit["dirty_paths"] = others
    else:
        commit["dirty"] = False
        commit["dirty_results_only"] = True
    with open(path, "w") as f:
        json.dump(data, f, indent=4)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help='leave out the heavy benchmarks (-m "not heavy")')
    parser.add_argument("--max-time", type=float, default=None,
                        help="--benchmark-max-time per benchmark (pytest-benchmark's default: 1 s)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--no-readme", action="store_true", help="write the tables and plots only")
    parser.add_argument("--jemalloc", default=None, help="caching mode with this jemalloc (LD_PRELOAD)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated run names to do (e.g. cpu-glibc); default: every allocator mode")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = _device()
    written = []
    status = 0
    runs = runs_for(device, args.jemalloc)
    if args.runs:
        wanted = args.runs.split(",")
        unknown = set(wanted) - {name for name, _ in runs}
        if unknown:
            parser.error(f"unknown run(s) {sorted(unknown)}; this device has {[name for name, _ in runs]}")
        runs = [run for run in runs if run[0] in wanted]
    for name, changes in runs:
        env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
        env.update(changes)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        path = os.path.join(args.out, f"{name}.json")
        cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks"), "--benchmark-only",
               f"--benchmark-json={path}", "-p", "no:cacheprovider", "-q"]
        if args.quick:
            cmd += ["-m", "not heavy"]
        if args.max_time is not None:
            cmd += [f"--benchmark-max-time={args.max_time}"]
        cmd += args.pytest_args
        label = " ".join(f"{k}={v}" for k, v in changes.items()) or "default allocator"
        print(f"=== {name} ({label}): {' '.join(cmd)}", flush=True)
        start = time.time()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(f"=== {name}: exit {rc} after {time.time() - start:.0f} s", flush=True)
        if rc != 0:
            status = rc
        if os.path.exists(path):
            settle_dirty_flag(path, args.out)
            written.append(path)
    if not written:
        print("no results written", file=sys.stderr)
        return status or 1
    report = [sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), *written, "--out", args.out]
    if not args.no_readme:
        report += ["--readme", os.path.join(ROOT, "README.md")]
    subprocess.run(report, cwd=ROOT, check=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
