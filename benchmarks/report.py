"""Turn pytest-benchmark JSON files into Markdown tables, plots with error bars, and the README's benchmark section.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json [more.json ...] --out benchmarks/results [--readme README.md]

Each JSON file is one run (one device, one allocator mode: a CPU suite is run twice, with glibc's default allocator
and with a caching one, see ``benchmarks/publish.py``). For every group (``"<op> <mode> | <shape>"``) the table
lists each peer's median time, its interquartile range (p25-p75, and the IQR as a % of the median), its speedup
over the group's eager baseline (``timm eager``, else ``official eager``, else ``reference eager``) with the range
that the quartiles allow (baseline p25 / peer p75 ... baseline p75 / peer p25), the achieved throughput (GB/s of the
op's bandwidth floor: bytes that must be read and written at least once; TFLOP/s where the benchmark gives FLOPs) and
the peer's max abs error against the reference, checked before timing. Skipped peers are listed with their reasons.
A row whose IQR exceeds ``NOISY_IQR`` of its median is flagged: its ratios are not to be trusted. Where a benchmark
also timed each peer in alternation with the baseline (``extra_info["vs_baseline"]``, the whole-model benchmarks),
that speedup gets its own column: on a machine whose speed drifts it is the ratio to read.

Plots (one PNG per op and mode, one panel per shape): horizontal bars of the median time on a log axis, error bars
from p25 to p75, one fixed colour per peer across every plot, skipped peers named in place of their bar.
``--readme`` replaces the text between ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` with each
run's header (device, versions, allocator, commit, date), the whole-model tables in full, and a one-line-per-group
summary of the op benchmarks linking to the full tables.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Sequence

# The eager baseline speedups are measured against: the timm module where the benchmark runs it (what a user would
# otherwise run), else the official code's eager arithmetic, else vitkernels' reference; the adapters' benchmarks
# (bench_compat.py): the unpatched Hugging Face / MONAI model.
BASELINE_PEERS = ("timm eager", "official eager", "reference eager", "transformers", "monai")
README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
NOISY_IQR = 0.10  # IQR above 10% of the median: flagged (the ratio's range says how much it can move)
MODEL_PREFIX = "model "  # groups of bench_models.py: shown in full in the README

# One colour per peer in every plot: known peers fixed here, any other one by a stable hash of its name.
PEER_COLOURS = {
    "vitkernels native": "#d62728",
    "vitkernels triton": "#ff7f0e",
    "vitkernels auto": "#e377c2",
    "vitkernels cuda": "#8c564b",
    "patched eager": "#d62728",
    "patched torch.compile": "#ff7f0e",
    "timm eager": "#1f77b4",
    "timm torch.compile": "#17becf",
    "timm sdpa": "#9467bd",
    "reference eager": "#7f7f7f",
    "reference torch.compile": "#bcbd22",
    "official eager": "#1f77b4",
    "official eager (as released)": "#aec7e8",
    "official torch.compile": "#17becf",
    "flex_attention": "#2ca02c",
    "xformers": "#98df8a",
    "GEMM floor (Linear + Conv only)": "#000000",
    "GEMM floor (Linear only)": "#000000",
    "GEMM floor (vitkernels linear)": "#666666",
}
_FALLBACK_COLOURS = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354", "#756bb1",
                     "#636363", "#e6550d"]


def peer_colour(peer: str) -> str:
    if peer in PEER_COLOURS:
        return PEER_COLOURS[peer]
    digest = int(hashlib.sha1(peer.encode()).hexdigest(), 16)
    return _FALLBACK_COLOURS[digest % len(_FALLBACK_COLOURS)]


def _is_ours(peer: str) -> bool:
    return peer.startswith("vitkernels") or peer.startswith("patched")


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# --- rows ---------------------------------------------------------------------------------------------------------

def group_rows(data: dict) -> "OrderedDict[str, List[dict]]":
    """group -> rows (measured ones sorted by median, then the skipped ones with their reasons)."""
    groups: "OrderedDict[str, List[dict]]" = OrderedDict()
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        stats = bench["stats"]
        median = stats["median"]
        row = {
            "peer": info.get("peer", bench["name"]),
            "median": median,
            "q1": stats.get("q1", median),
            "q3": stats.get("q3", median),
            "rounds": stats.get("rounds"),
            "gbps": info.get("bytes", 0) / median / 1e9 if info.get("bytes") else None,
            "tflops": info.get("flops", 0) / median / 1e12 if info.get("flops") else None,
            "err": info.get("max_abs_err"),
            "peak_mib": info.get("peak_memory_mib"),
            "vs_baseline": info.get("vs_baseline"),  # conftest.interleaved_speedup, where the benchmark took it
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


def baseline(rows: List[dict]) -> Optional[dict]:
    """The measured row speedups are relative to: the first of BASELINE_PEERS present."""
    for name in BASELINE_PEERS:
        row = next((r for r in rows if r["peer"] == name and r["median"] is not None), None)
        if row is not None:
            return row
    return None


def speedup(base: dict, row: dict) -> str:
    """Median ratio, and the range the quartiles allow (slowest plausible .. fastest plausible)."""
    mid = base["median"] / row["median"]
    lo = base["q1"] / row["q3"] if row["q3"] else mid
    hi = base["q3"] / row["q1"] if row["q1"] else mid
    return f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"


def iqr_pct(row: dict) -> float:
    return (row["q3"] - row["q1"]) / row["median"] if row["median"] else 0.0


# --- header -------------------------------------------------------------------------------------------------------

def cpu_label(cpu: dict) -> str:
    """The CPU's brand with its x86 family / model and widest SIMD. A VM's brand string alone ("AMD EPYC") hides the
    core generation, and the GEMM-bound CPU results depend on it: a Zen 5 EPYC (family 26) runs AVX-512 FMAs at full
    width, a Zen 4 (family 25) at half, and MKL's and oneDNN's GEMMs do not gain alike from that."""
    label = cpu.get("brand_raw", "unknown")
    if cpu.get("family") is not None and cpu.get("model") is not None:
        flags = set(cpu.get("flags", ()))
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
        label += f", x86 family {cpu['family']} model {cpu['model']}" + (f", {simd}" if simd else "")
    return label


def run_info(data: dict) -> dict:
    machine = data.get("machine_info", {})
    ours = machine.get("vitkernels", {})
    commit = data.get("commit_info", {})
    if ours.get("device_type") == "cpu":
        device = f"CPU ({cpu_label(machine.get('cpu', {}))}, {ours.get('cpu_threads')} threads)"
    else:
        device = ours.get("device") or "unknown device"
    return {
        "device": device,
        "allocator": ours.get("allocator", "?"),
        "mode": ("caching allocator" if str(ours.get("allocator", "")).startswith("caching") else
                 ours.get("allocator", "?")) if ours.get("device_type") == "cpu" else (ours.get("device") or "?"),
        "versions": f"torch {ours.get('torch', '?')}, triton {ours.get('triton', '?')}, CUDA {ours.get('cuda', '?')}, "
                    f"timm {ours.get('timm', '?')}, Python {ours.get('python', '?')}",
        "commit": f"{commit.get('id', '?')[:10]}{' (dirty)' if commit.get('dirty') else ''}",
        "date": data.get("datetime", "?")[:19],
        # "; GEMM peak ..." where the run measured it (conftest.measured_gemm_peak), appended to the run's line as is
        "gemm_peak": (f"; GEMM peak {ours['gemm_peak']['tflops']:.3f} TFLOP/s ({ours['gemm_peak']['what']})"
                      if ours.get("gemm_peak") else ""),
    }


def header(data: dict) -> str:
    info = run_info(data)
    return (f"device: {info['device']}; allocator: {info['allocator']}; {info['versions']}; "
            f"commit {info['commit']}; measured {info['date']}{info['gemm_peak']}")


# --- Markdown -----------------------------------------------------------------------------------------------------

def interleaved_cell(row: dict, base: Optional[dict]) -> str:
    """The speedup over the baseline timed in alternation with it (``median (q1-q3)``), ``1.00x`` for the baseline
    itself, empty where the benchmark did not take one."""
    vs = row.get("vs_baseline")
    if vs:
        return f"{vs['median']:.2f}x ({vs['q1']:.2f}-{vs['q3']:.2f})"
    return "1.00x" if base is not None and row is base else ""


def group_table(group: str, rows: List[dict]) -> List[str]:
    measured = [r for r in rows if r["median"] is not None]
    base = baseline(measured)
    interleaved = any(r.get("vs_baseline") for r in measured)
    lines = [f"**{group}**" + (f" (speedups vs {base['peer']})" if base else ""), ""]
    if interleaved:
        lines += ["| peer | median | IQR (p25-p75) | speedup (quartile range) | speedup, interleaved (p25-p75) "
                  "| GB/s | TFLOP/s | max abs err | rounds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| peer | median | IQR (p25-p75) | speedup (quartile range) | GB/s | TFLOP/s | max abs err "
                  "| rounds |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["median"] is None:
            lines.append(f"| {r['peer']} | skipped: {r['reason']} |" + " |" * (7 if interleaved else 6))
            continue
        noisy = " (noisy)" if iqr_pct(r) > NOISY_IQR else ""
        iqr = f"{fmt_time(r['q1'])}-{fmt_time(r['q3'])}, {100 * iqr_pct(r):.0f}%{noisy}"
        vs = speedup(base, r) if base else ""
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") else ""
        tflops = f"{r['tflops']:.2f}" if r.get("tflops") else ""
        err = f"{r['err']:.1e}" if r.get("err") is not None else ""
        name = f"**{r['peer']}**" if _is_ours(r["peer"]) else r["peer"]
        extra = f" {interleaved_cell(r, base)} |" if interleaved else ""
        lines.append(f"| {name} | {fmt_time(r['median'])} | {iqr} | {vs} |{extra} {gbps} | {tflops} | {err} | "
                     f"{r.get('rounds') or ''} |")
    lines.append("")
    return lines


def markdown(data: dict) -> str:
    lines = [f"_{header(data)}_", ""]
    for group, rows in group_rows(data).items():
        lines += group_table(group, rows)
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (group names contain '|')."""
    return text.replace("|", "\\|")


def summary_cell(rows: List[dict]) -> str:
    """Every measured peer by median with half its IQR in %, and its speedup over the baseline (the ratio of the
    medians, then the one timed in alternation with the baseline where the benchmark took it); then the skipped."""
    measured = [r for r in rows if r["median"] is not None]
    base = baseline(measured)
    cells = []
    for r in measured:
        name = f"**{r['peer']}**" if _is_ours(r["peer"]) else r["peer"]
        ratio = f", {base['median'] / r['median']:.2f}x" if base and r is not base else ""
        if ratio and r.get("vs_baseline"):
            ratio += f" (interleaved {r['vs_baseline']['median']:.2f}x)"
        cells.append(f"{name} {fmt_time(r['median'])} ±{100 * iqr_pct(r) / 2:.0f}%{ratio}")
    skipped = [r["peer"] for r in rows if r["median"] is None]
    tail = f" (skipped: {', '.join(skipped)})" if skipped else ""
    return _cell(" · ".join(cells) + tail)


# --- plots --------------------------------------------------------------------------------------------------------

def _tick(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:g} {unit}"
    return f"{seconds * 1e9:g} ns"


def _short(reason: str, n: int = 70) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def plots(data: dict, out_dir: str, suffix: str = "") -> List[str]:
    """One PNG per op and mode: a panel per shape, a horizontal bar per peer (median, p25-p75 error bar, log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    by_op: Dict[str, "OrderedDict[str, List[dict]]"] = defaultdict(OrderedDict)
    for group, rows in group_rows(data).items():
        op, _, shape = group.partition(" | ")
        by_op[op][shape or op] = rows
    info = run_info(data)
    written = []
    for op, shapes in by_op.items():
        heights = [max(1, len(rows)) for rows in shapes.values()]
        fig, axes = plt.subplots(len(shapes), 1, figsize=(9, 0.9 + 0.32 * sum(heights) + 0.5 * len(shapes)),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (shape, rows) in zip(axes[:, 0], shapes.items()):
            measured = [r for r in rows if r["median"] is not None]
            ys = list(range(len(rows)))[::-1]
            lo_all = min((r["q1"] for r in measured), default=1e-6)
            for y, r in zip(ys, rows):
                if r["median"] is None:
                    ax.text(lo_all, y, f"  skipped: {_short(r['reason'])}", va="center", fontsize=7, color="#555555")
                    continue
                err = [[r["median"] - r["q1"]], [r["q3"] - r["median"]]]
                ax.barh(y, r["median"], xerr=err, color=peer_colour(r["peer"]), capsize=3, height=0.7,
                        error_kw={"elinewidth": 1})
                ax.text(r["q3"], y, f" {fmt_time(r['median'])}", va="center", fontsize=7)
            ax.set_yticks(ys)
            ax.set_yticklabels([r["peer"] for r in rows], fontsize=8)
            ax.set_ylim(-0.6, len(rows) - 0.4)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", labelsize=7)
            if measured:
                hi_all = max(r["q3"] for r in measured) * 4
                ax.set_xlim(lo_all / 1.5, hi_all)

            ax.set_title(shape, fontsize=8, loc="left")
            ax.grid(axis="x", which="both", lw=0.3, alpha=0.5)
        axes[-1, 0].set_xlabel("time per call (log scale; bar = median, whiskers = p25-p75; shorter is faster)",
                               fontsize=8)
        fig.suptitle(f"{op} - {info['device']}, allocator: {info['allocator']}", fontsize=9)
        fig.tight_layout()
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", op).strip("_") + suffix + ".png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# --- README -------------------------------------------------------------------------------------------------------

def readme_section(runs: Sequence[dict], tables: Sequence[str], figures: Sequence[str], base_dir: str) -> str:
    """The README's benchmark section: each run's header, the whole-model tables, one summary row per op group
    (a column per run), the whole-model plots, links to the other plots."""
    lines = []
    for data, table in zip(runs, tables):
        info = run_info(data)
        lines.append(f"- {info['device']}, allocator **{info['allocator']}**: {info['versions']}; commit "
                     f"{info['commit']}; {info['date']}{info['gemm_peak']} "
                     f"([all tables]({os.path.relpath(table, base_dir)}))")
    lines.append("")
    model_groups = [(data, g, rows) for data in runs for g, rows in group_rows(data).items()
                    if g.startswith(MODEL_PREFIX)]
    if model_groups:
        lines += ["#### Whole models", ""]
        for data, group, rows in model_groups:
            lines += group_table(f"{group} [{run_info(data)['mode']}]", rows)
    per_run = [group_rows(data) for data in runs]
    groups = list(OrderedDict.fromkeys(g for rows in per_run for g in rows if not g.startswith(MODEL_PREFIX)))
    if groups:
        modes = [run_info(data)["mode"] for data in runs]
        lines += ["#### Ops and blocks", "",
                  "Each peer: median ±half the IQR (in % of the median), speedup over the group's eager baseline "
                  "(the ratio of the medians; \"interleaved\": timed in alternation with the baseline, where the "
                  "benchmark did: the ratio to read).", "",
                  "| group | baseline | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
        for group in groups:
            base = next((baseline([r for r in rows[group] if r["median"] is not None])
                         for rows in per_run if group in rows), None)
            cells = [summary_cell(rows[group]) if group in rows else "" for rows in per_run]
            lines.append(f"| {_cell(group)} | {base['peer'] if base else ''} | " + " | ".join(cells) + " |")
        lines.append("")
    shown = [p for p in figures if os.path.basename(p).startswith("model_")]
    others = [p for p in figures if p not in shown]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, base_dir)})" for p in shown]
    if others:
        lines += ["", "Plots: " + ", ".join(
            f"[{os.path.splitext(os.path.basename(p))[0]}]({os.path.relpath(p, base_dir)})" for p in others)]
    return "\n".join(lines)


def update_readme(readme: str, section: str) -> None:
    with open(readme) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} section")
    start = text.index(README_START) + len(README_START)
    text = text[:start] + "\n" + section + "\n" + text[text.index(README_END):]
    with open(readme, "w") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="files written by --benchmark-json (one per run)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the .md tables and .png plots")
    parser.add_argument("--readme", default=None, help="README to update between the benchmark markers")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plots-for", default=None,
                        help="plot only the run whose JSON file name contains this (default: every run)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs, tables, figures = [], [], []
    for path in args.json:
        data = load(path)
        name = os.path.splitext(os.path.basename(path))[0]
        md_path = os.path.join(args.out, f"{name}.md")
        with open(md_path, "w") as f:
            f.write(markdown(data) + "\n")
        runs.append(data)
        tables.append(md_path)
        if not args.no_plots and (args.plots_for is None or args.plots_for in name):
            figures += plots(data, args.out, suffix="" if len(args.json) == 1 else f"-{name}")
    if args.readme:
        base = os.path.dirname(os.path.abspath(args.readme))
        section = readme_section(runs, [os.path.abspath(t) for t in tables], [os.path.abspath(p) for p in figures],
                                 base)
        update_readme(args.readme, section)
    print("wrote " + ", ".join(tables + figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
