"""Turn a pytest-benchmark JSON file into Markdown tables and one PNG plot per op.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json --out benchmarks/results [--readme README.md]

For every group (``"<op> | <shape>"``) a table lists each peer's median time, its speedup over the eager baseline
(``reference eager``, else ``official eager``, else ``timm eager``), how much faster the best vitkernels backend is
than it, the achieved throughput (GB/s of the op's bandwidth floor:
bytes that must be read and written at least once, and TFLOP/s where the benchmark gives FLOPs), and that
throughput as a percentage of the device's measured copy bandwidth. Skipped peers are listed with their reasons.
The header names the device, torch / triton versions and the commit measured. ``--readme`` replaces the text between
``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` in that file with the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional

# The eager baseline speedups are measured against: vitkernels' reference where the benchmark runs it, else the
# official code's eager arithmetic (MAE / DINO / MSN benchmarks), else timm's eager module.
BASELINE_PEERS = ("reference eager", "official eager", "timm eager")
README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _is_ours(peer: str) -> bool:
    return peer.startswith("vitkernels")


def _fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def group_rows(data: dict) -> "OrderedDict[str, List[dict]]":
    """group -> rows of {peer, median, gbps, tflops, skipped reason}, measured ones sorted fastest first."""
    groups: "OrderedDict[str, List[dict]]" = OrderedDict()
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        median = bench["stats"]["median"]
        row = {
            "peer": info.get("peer", bench["name"]),
            "median": median,
            "gbps": info.get("bytes", 0) / median / 1e9 if info.get("bytes") else None,
            "tflops": info.get("flops", 0) / median / 1e12 if info.get("flops") else None,
            "peak_mib": info.get("peak_memory_mib"),
            "reason": None,
        }
        groups.setdefault(bench.get("group") or bench["name"], []).append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: r["median"])
    for skip in data.get("skipped", []):
        group = skip.get("group") or skip["nodeid"]
        groups.setdefault(group, []).append(
            {"peer": skip.get("peer") or skip["nodeid"], "median": None, "reason": skip.get("reason", "")}
        )
    return groups


def header(data: dict) -> str:
    machine = data.get("machine_info", {})
    ours = machine.get("vitkernels", {})
    commit = data.get("commit_info", {})
    device = ours.get("device") or machine.get("cpu", {}).get("brand_raw", "unknown device")
    if ours.get("device_type") == "cpu":
        device = f"CPU ({machine.get('cpu', {}).get('brand_raw', 'unknown')}, {ours.get('cpu_threads')} threads)"
    parts = [
        f"device: {device}",
        f"torch {ours.get('torch', '?')}",
        f"triton {ours.get('triton', '?')}",
        f"CUDA {ours.get('cuda', '?')}",
        f"commit {commit.get('id', '?')[:10]}{' (dirty)' if commit.get('dirty') else ''}",
        f"measured {data.get('datetime', '?')[:19]}",
        f"copy bandwidth {ours.get('copy_gbps', '?')} GB/s",
    ]
    return "; ".join(parts)


def baseline(rows: List[dict]) -> Optional[dict]:
    """The measured row speedups are relative to: the first of BASELINE_PEERS present."""
    for name in BASELINE_PEERS:
        row = next((r for r in rows if r["peer"] == name and r["median"] is not None), None)
        if row is not None:
            return row
    return None


def markdown(data: dict) -> str:
    copy_gbps = data.get("machine_info", {}).get("vitkernels", {}).get("copy_gbps")
    lines = [f"_{header(data)}_", ""]
    for group, rows in group_rows(data).items():
        measured = [r for r in rows if r["median"] is not None]
        base = baseline(measured)
        ref = base["median"] if base else None
        best_ours = min((r["median"] for r in measured if _is_ours(r["peer"])), default=None)
        lines += [f"**{group}**" + (f" (baseline: {base['peer']})" if base else ""), "",
                  "| peer | median | speedup vs baseline | best vitkernels speedup over it | GB/s | % of copy bw | TFLOP/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["median"] is None:
                lines.append(f"| {r['peer']} | skipped: {r['reason']} | | | | | |")
                continue
            vs_ref = f"{ref / r['median']:.2f}x" if ref else ""
            ours_vs = f"{r['median'] / best_ours:.2f}x" if best_ours and not _is_ours(r["peer"]) else ""
            gbps = f"{r['gbps']:.1f}" if r["gbps"] else ""
            pct = f"{100 * r['gbps'] / copy_gbps:.0f}%" if r["gbps"] and copy_gbps else ""
            tflops = f"{r['tflops']:.2f}" if r["tflops"] else ""
            name = f"**{r['peer']}**" if _is_ours(r["peer"]) else r["peer"]
            lines.append(f"| {name} | {_fmt_time(r['median'])} | {vs_ref} | {ours_vs} | {gbps} | {pct} | {tflops} |")
        lines.append("")
    return "\n".join(lines)


def plots(data: dict, out_dir: str) -> List[str]:
    """One PNG per op: speedup over the eager baseline of every measured peer, one bar cluster per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_op: Dict[str, Dict[str, List[dict]]] = defaultdict(dict)
    for group, rows in group_rows(data).items():
        op, _, shape = group.partition(" | ")
        by_op[op][shape or op] = [r for r in rows if r["median"] is not None]
    written = []
    for op, shapes in by_op.items():
        peers = sorted({r["peer"] for rows in shapes.values() for r in rows})
        fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(shapes) * max(1, len(peers)) / 3), 4))
        width = 0.8 / max(1, len(peers))
        for i, peer in enumerate(peers):
            values = []
            for rows in shapes.values():
                base = baseline(rows)
                ref = base["median"] if base else None
                this = next((r["median"] for r in rows if r["peer"] == peer), None)
                values.append(ref / this if ref and this else 0.0)
            ax.bar([x + i * width for x in range(len(shapes))], values, width, label=peer)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels(list(shapes), rotation=10, fontsize=8)
        ax.axhline(1.0, color="gray", lw=0.8)
        base = next((baseline(rows) for rows in shapes.values() if baseline(rows)), None)
        ax.set_ylabel(f"speedup over {base['peer'] if base else 'baseline'} (higher is better)")
        ax.set_title(f"{op} — {header(data).split(';')[0]}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", op) + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def update_readme(readme: str, table: str, figures: List[str]) -> None:
    with open(readme) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} section")
    base = os.path.dirname(os.path.abspath(readme))
    images = "\n".join(f"![{os.path.basename(p)}]({os.path.relpath(p, base)})" for p in figures)
    start = text.index(README_START) + len(README_START)
    text = text[:start] + "\n" + table + "\n" + images + "\n" + text[text.index(README_END):]
    with open(readme, "w") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="file written by --benchmark-json")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the .md table and .png plots")
    parser.add_argument("--readme", default=None, help="README to update between the benchmark markers")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    data = load(args.json)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(data)
    name = os.path.splitext(os.path.basename(args.json))[0]
    md_path = os.path.join(args.out, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(table + "\n")
    figures = [] if args.no_plots else plots(data, args.out)
    if args.readme:
        update_readme(args.readme, table, figures)
    print(f"wrote {md_path}" + "".join(f", {p}" for p in figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
