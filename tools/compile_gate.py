"""GPU-free compile gate for the Triton kernels: every launch configuration, compiled for sm_80 and sm_90.

    python tools/compile_gate.py                       # compile, check, print a summary; exit 1 on a failure
    python tools/compile_gate.py --table               # also regenerate benchmarks/results/kernel-resources.md
    python tools/compile_gate.py --json rows.json -j 2 # rows as JSON, two compile processes

What is compiled. For every Triton op, its launch-configuration table's ``table_examples()`` (every configuration
the table can return on sm_80 and sm_90, each with a tiny problem that selects it), plus the headline problems
(window attention at window 7 and 12, head_dim 32 and 64, bf16 and fp16, shifted; 3D window attention at
7x7x7 head_dim 16 / 32 and 8x7x7 head_dim 32) and each op's benchmark-suite
shapes. Each problem is run through the op's host launchers with meta tensors under
:func:`vitkernels.triton._launch.recording` (nothing launches): the recorded launches -- kernel, arguments,
constexprs, warps, stages -- are exactly what the launcher would launch on that GPU, and
``tools/kernel_resources.py`` compiles each for its architecture.

The gate fails when a kernel does not compile, when its shared memory exceeds the architecture's per-block limit
(every compiled configuration is one the dispatcher accepts there: the examples come from the tables, which only
return accepted configurations), or when a headline configuration spills registers.

``--table`` writes the Markdown table of every row; when ``tools/compile_gate_cuda.py`` exists its JSON rows (the
same format, for the CUDA kernels compiled by nvcc) are merged in.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import kernel_resources  # noqa: E402
from vitkernels.triton._launch import GATE_TARGETS, SM90, Target, forced_target, recording  # noqa: E402

TABLE_PATH = os.path.join(ROOT, "benchmarks", "results", "kernel-resources.md")
CUDA_GATE = os.path.join(ROOT, "tools", "compile_gate_cuda.py")


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


# --- how each op's host launchers are driven for a problem (meta tensors) ------------------------------------------

def _window_attention(problem) -> None:
    from vitkernels.triton import window_attention as wa

    # (case, dtype[, parameter dtype[, also the inference forward]])
    (B, H, W, nH, hd, window, shift), dtype = problem[:2]
    bias_dtype = problem[2] if len(problem) > 2 else dtype
    C = nH * hd
    qkv = meta(B, H, W, 3 * C, dtype=dtype)
    table = meta((2 * window[0] - 1) * (2 * window[1] - 1), nH, dtype=bias_dtype)
    bias = meta(3 * C, dtype=bias_dtype)
    scale = hd ** -0.5
    out, lse = wa.window_attention_fwd(qkv, table, bias, window, shift, nH, scale, need_lse=True)
    if len(problem) > 3 and problem[3]:  # the inference variant (no log-sum-exp store)
        wa.window_attention_fwd(qkv, table, bias, window, shift, nH, scale, need_lse=False)
    wa.window_attention_bwd(meta(B, H, W, C, dtype=dtype), qkv, table, bias, out, lse, window, shift, nH, scale)


def _window_attention_v2(problem) -> None:
    from vitkernels.triton import window_attention_v2 as wa

    # (case, dtype[, parameter dtype[, also the inference forward]]): V1's kernels with COSINE set
    (B, H, W, nH, hd, window, shift), dtype = problem[:2]
    param_dtype = problem[2] if len(problem) > 2 else dtype
    C = nH * hd
    qkv = meta(B, H, W, 3 * C, dtype=dtype)
    table = meta((2 * window[0] - 1) * (2 * window[1] - 1), nH, dtype=param_dtype)
    scale = meta(nH, dtype=param_dtype)
    bias = meta(3 * C, dtype=param_dtype)
    out, lse = wa.window_attention_v2_fwd(qkv, table, scale, bias, window, shift, nH, need_lse=True)
    if len(problem) > 3 and problem[3]:
        wa.window_attention_v2_fwd(qkv, table, scale, bias, window, shift, nH, need_lse=False)
    wa.window_attention_v2_bwd(meta(B, H, W, C, dtype=dtype), qkv, table, scale, bias, out, lse, window, shift, nH)


def _window_attention_3d(problem) -> None:
    from vitkernels.triton import window_attention_3d as wa

    # ((B, (D, H, W), nH, hd, window, shift, pad_before_shift), dtype[, parameter dtype]): V1's kernels, depth axis
    (B, size, nH, hd, window, shift, first), dtype = problem[:2]
    param_dtype = problem[2] if len(problem) > 2 else dtype
    C = nH * hd
    qkv = meta(B, *size, 3 * C, dtype=dtype)
    table = meta((2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1), nH, dtype=param_dtype)
    bias = meta(3 * C, dtype=param_dtype)
    scale = hd ** -0.5
    out, lse = wa.window_attention_3d_fwd(qkv, table, bias, window, shift, nH, scale, first, need_lse=True)
    wa.window_attention_3d_bwd(meta(B, *size, C, dtype=dtype), qkv, table, bias, out, lse, window, shift, nH, scale,
                               first)


def _window_partition(problem) -> None:
    from vitkernels.triton import window_partition as wp

    B, H, W, C, window, shift = problem[:6]
    dtype = problem[6] if len(problem) > 6 else torch.float32
    win = wp.window_partition(meta(B, H, W, C, dtype=dtype), window, shift)
    wp.window_reverse(win, H, W, window, shift)


def _patch_embed(problem) -> None:
    from vitkernels.triton import patch_embed as pe

    B, C, H, W, D, patch, pad, P, dtype = problem
    gh = -(-H // patch[0]) if pad else H // patch[0]
    gw = -(-W // patch[1]) if pad else W // patch[1]
    x, w = meta(B, C, H, W, dtype=dtype), meta(D, C, *patch, dtype=dtype)
    prefix = meta(P, D, dtype=dtype) if P else None
    pe.patch_embed_fwd(x, w, meta(D, dtype=dtype), meta(P + gh * gw, D, dtype=dtype), prefix, False, pad)
    pe.patch_embed_bwd(meta(B, P + gh * gw, D, dtype=dtype), x, w, P, pad, True, True)


def _dino_loss(problem) -> None:
    from vitkernels.triton import dino_loss as dl

    B, K, ncrops, dtype = problem
    s, t, c = meta(ncrops * B, K, dtype=dtype), meta(2 * B, K, dtype=dtype), meta(1, K)
    loss, s_lse, t_lse, c_copy = dl.dino_loss_fwd(s, t, c, ncrops, 0.1, 0.04)
    dl.dino_loss_bwd(meta(), s, t, c_copy, s_lse, t_lse, ncrops, 0.1, 0.04)
    dl.dino_center_update(c, t, 0.9)


def _msn_loss(problem) -> None:
    from vitkernels.triton import msn_loss as ml

    B, V, K, D, dtype = problem
    a, x, p = meta(V * B, D, dtype=dtype), meta(B, D, dtype=dtype), meta(K, D, dtype=dtype)
    z, rn = ml.msn_logits(a, x, p, 0.1)
    t = ml.msn_targets(z, V * B, 0.25)
    terms, stats, avg = ml.msn_anchor_fwd(z, t, V * B, True, True)
    ml.msn_bwd(meta(3), a, p, z, t, rn, stats, avg, 0.1, True, True, True, True)


def _masking(problem) -> None:
    from vitkernels.triton import masking as mk

    N, L, D, keep, dtype = problem
    ids_restore, ids_keep, _ = mk.rank_noise(meta(N, L), keep, dtype)
    mk.gather_rows(meta(N, L, D, dtype=dtype), ids_keep, meta(1, L, D, dtype=dtype))  # MAE kept tokens + pos
    mk.mae_unshuffle(meta(N, keep + 1, D, dtype=dtype), ids_restore, meta(D, dtype=dtype),
                     meta(1, L + 1, D, dtype=dtype))
    mk.mae_unshuffle_backward(meta(N, L + 1, D, dtype=dtype), ids_restore, keep, dtype)
    mk.gather_rows(meta(N, 1 + L, D, dtype=dtype), torch.empty(1 + keep, dtype=torch.int64, device="meta"))  # MSN


def _mae_loss(problem) -> None:
    from vitkernels.triton import mae_loss as ml

    N, C, H, W, p, norm_pix, dtype = problem
    L = (H // p) * (W // p)
    imgs, pred, mask = meta(N, C, H, W), meta(N, L, p * p * C, dtype=dtype), meta(N, L, dtype=dtype)
    ml.mae_loss(imgs, pred, mask, p, norm_pix)
    ml.mae_loss_backward(meta(), imgs, pred, mask, p, norm_pix)


INVOKERS: Dict[str, Callable[[Any], None]] = {
    "window_attention": _window_attention,
    "window_attention_v2": _window_attention_v2,
    "window_attention_3d": _window_attention_3d,
    "window_partition": _window_partition,
    "patch_embed": _patch_embed,
    "dino_loss": _dino_loss,
    "msn_loss": _msn_loss,
    "masking": _masking,
    "mae_loss": _mae_loss,
}


def _table_modules():
    from vitkernels.triton import (
        dino_loss,
        mae_loss,
        masking,
        msn_loss,
        patch_embed,
        window_attention,
        window_attention_3d,
        window_attention_v2,
        window_partition,
    )

    return [window_attention, window_attention_v2, window_attention_3d, window_partition, patch_embed, masking,
            mae_loss, dino_loss, msn_loss]


def extreme_problems() -> List[Tuple[str, str, Any]]:
    """(op, label, problem) at the limits ``supported_reason`` accepts: their shared memory must fit, spills are
    reported but allowed."""
    out = []
    for ws, hd, dtype in ((16, 128, torch.float32), (16, 128, torch.bfloat16), (12, 128, torch.float32),
                          (7, 128, torch.float32)):
        name = str(dtype).replace("torch.", "")
        for op in ("window_attention", "window_attention_v2"):
            out.append((op, f"extreme {'v2 ' if op.endswith('v2') else ''}ws{ws} hd{hd} {name}",
                        ((2, 2 * ws + 1, 2 * ws, 2, hd, (ws, ws), (ws // 2, ws // 2)), dtype)))
    # Swin V2 at window 16, head_dim 64 (no SwinV2 model has it: all use head_dim 32): the cosine dQ kernel's
    # 16-row tiles over two 128-key chunks spill on sm_90 (80 bytes at the time of writing), reported, not gated
    for dtype in (torch.bfloat16, torch.float16):
        out.append(("window_attention_v2", f"v2 ws16 hd64 {str(dtype).replace('torch.', '')}",
                    ((32, 128, 128, 2, 64, (16, 16), (8, 8)), dtype)))
    return out


def headline_problems() -> List[Tuple[str, str, Any, Tuple[Target, ...]]]:
    """(op, label, problem, targets) of the headline configurations and the benchmark-suite shapes: window
    attention at ws 7 / 12, head_dim 32 / 64 in bf16 on sm_80 and sm_90 and in fp16 on sm_90 (the examples compile
    fp16 on sm_80); Swin V2 window attention (SwinV2-T's windows 8 and 16) at ws 8 hd 32, ws 16 hd 32 in bf16 and
    fp16 on both; 3D window attention (MONAI SwinUNETR's 7x7x7 windows at head_dim 16 and 32, Video Swin's 8x7x7 at
    head_dim 32, shifted, MONAI's padding order) in bf16 and fp16 on both; and each op's benchmark shapes (GPU sizes
    and dtypes of benchmarks/bench_<op>.py) on both."""
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        for window, hd, nH in (((7, 7, 7), 16, 3), ((7, 7, 7), 32, 3), ((8, 7, 7), 32, 3)):
            size = tuple(2 * w for w in window)  # 8 windows per volume, 2 volumes
            shift = tuple(w // 2 for w in window)
            label = f"headline 3d w{'x'.join(map(str, window))} hd{hd} {name}"
            out.append(("window_attention_3d", label, ((2, size, nH, hd, window, shift, True), dtype, torch.float32),
                        GATE_TARGETS))
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        for ws, hd in ((8, 32), (16, 32)):
            nH = 3 if hd == 32 else 2
            side = 8 * ws
            out.append(("window_attention_v2", f"headline v2 ws{ws} hd{hd} {name}",
                        ((32, side, side, nH, hd, (ws, ws), (ws // 2, ws // 2)), dtype), GATE_TARGETS))
    for dtype, targets in ((torch.bfloat16, GATE_TARGETS), (torch.float16, (SM90,))):
        name = str(dtype).replace("torch.", "")
        for ws in (7, 12):
            for hd in (32, 64):
                nH = 3 if hd == 32 else 2
                side = 8 * ws  # 8 x 8 windows per image, 32 images
                out.append(("window_attention", f"headline ws{ws} hd{hd} {name}",
                            ((32, side, side, nH, hd, (ws, ws), (ws // 2, ws // 2)), dtype), targets))
    bf16, fp32, both = torch.bfloat16, torch.float32, GATE_TARGETS
    bench = [
        # window attention: bf16 qkv, fp32 table and qkv bias as under autocast; also the inference forward
        ("window_attention", "bench swin-t stage1 56x56 C96 h3 ws7",
         ((128, 56, 56, 3, 32, (7, 7), (3, 3)), bf16, fp32, True)),
        ("window_attention", "bench swin-t stage3 14x14 C384 h12 ws7",
         ((128, 14, 14, 12, 32, (7, 7), (3, 3)), bf16, fp32, True)),
        ("window_attention", "swin-b 384 stage1 96x96 C128 h4 ws12", ((32, 96, 96, 4, 32, (12, 12), (6, 6)), bf16,
                                                                      fp32, True)),
        # Swin V2 window attention: benchmarks/bench_swin_v2.py's op shapes (bf16 qkv, fp32 table / scale / bias)
        ("window_attention_v2", "bench swinv2-t stage1 64x64 C96 h3 ws8",
         ((128, 64, 64, 3, 32, (8, 8), (4, 4)), bf16, fp32)),
        ("window_attention_v2", "bench swinv2-b stage1 64x64 C128 h4 ws16",
         ((32, 64, 64, 4, 32, (16, 16), (8, 8)), bf16, fp32)),
        ("window_partition", "bench swin-t stage1 56x56x96 ws7", (128, 56, 56, 96, (7, 7), (3, 3), bf16)),
        ("window_partition", "bench swin-t stage3 14x14x384 ws7", (128, 14, 14, 384, (7, 7), (3, 3), bf16)),
        ("patch_embed", "bench vit-b16 224 b256 bf16", (256, 3, 224, 224, 768, (16, 16), False, 1, bf16)),
        ("patch_embed", "bench vit-b16 384 b256 bf16", (256, 3, 384, 384, 768, (16, 16), False, 1, bf16)),
        ("masking", "bench vit-l/16 mae b256 bf16 encoder D1024", (256, 196, 1024, 49, bf16)),
        ("masking", "bench vit-l/16 mae b256 bf16 decoder D512", (256, 196, 512, 49, bf16)),
        ("mae_loss", "bench vit-l/16 b256 pred bf16", (256, 3, 224, 224, 16, True, bf16)),
        ("dino_loss", "bench K65536 B64 2+8 crops fp32", (64, 65536, 10, fp32)),
        ("dino_loss", "bench K65536 B64 2+8 crops bf16", (64, 65536, 10, bf16)),
        ("msn_loss", "bench K1024 D256 B64 11 views fp32", (64, 11, 1024, 256, fp32)),
        ("msn_loss", "bench K1024 D256 B64 11 views bf16", (64, 11, 1024, 256, bf16)),
    ]
    return out + [(op, label, problem, both) for op, label, problem in bench]


# --- collecting the launches ----------------------------------------------------------------------------------------

class Item:
    """One compile: a recorded launch for an architecture, with the problems that lead to it."""

    def __init__(self, launch, target: Target, problem: str, headline: bool):
        self.launch, self.target, self.problems, self.headline = launch, target, [problem], headline

    def key(self):
        kernel = self.launch.kernel
        bound = dict(zip(kernel.arg_names, self.launch.args))
        bound.update(self.launch.kwargs)
        sig, consts, _ = kernel_resources._signature(kernel, {k: bound[k] for k in kernel.arg_names})
        opts = tuple(sorted((k, v) for k, v in self.launch.kwargs.items() if k in kernel_resources.LAUNCH_OPTIONS))
        return (self.target.arch, self.launch.name, tuple(sorted(sig.items())),
                tuple(sorted((k, str(v)) for k, v in consts.items())), opts)


def record(op: str, problem, target: Target) -> List[Any]:
    with forced_target(target), recording(launch=False) as launches:
        INVOKERS[op](problem)
    return list(launches)


def collect(only: str = "", example_archs: Tuple[str, ...] = ()) -> List[Item]:
    """The compiles: every table example's launches (only on ``example_archs`` where given), the extreme problems'
    and the headline problems' on every gate architecture, deduplicated."""
    items: Dict[Any, Item] = {}

    def add(op, problem, label, target, headline):
        if only and only not in label:
            return
        for launch in record(op, problem, target):
            item = Item(launch, target, label, headline)
            key = item.key()
            if key in items:
                items[key].problems.append(label)
                items[key].headline |= headline
            else:
                items[key] = item

    for module in _table_modules():
        for ex in module.table_examples():
            if not example_archs or ex.target.arch in example_archs:
                add(ex.op, ex.problem, f"{ex.op} example {_problem_label(ex.problem)}", ex.target, False)
    for op, label, problem in extreme_problems():
        for target in GATE_TARGETS:
            add(op, problem, label, target, False)
    for op, label, problem, targets in headline_problems():
        for target in targets:
            add(op, problem, label, target, True)
    return list(items.values())


def _problem_label(problem) -> str:
    return str(problem).replace("torch.", "").replace(" ", "")


# --- compiling (forked workers share the collected launches) --------------------------------------------------------

_ITEMS: List[Item] = []
_SASS = [True]  # SASS instruction counts wanted (set before the workers fork)
_ASSEMBLE_ALL = [True]  # ptxas for every compile, not only the headline configurations (set before the fork)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _compile(index: int) -> Dict[str, Any]:
    item = _ITEMS[index]
    start, cpu = time.time(), _cpu_seconds()
    row = kernel_resources.compile_launch(item.launch, item.target.arch, keep_dir=os.environ.get("GATE_KEEP_DIR"),
                                         sass=_SASS[0], assemble=_ASSEMBLE_ALL[0] or item.headline)
    row["headline"] = item.headline
    if item.launch.kwargs.get("COSINE"):  # Swin V2's cosine attention: V1's kernels, their own compile
        row["config"] += " COSINE"
    row["extra"]["problems"] = item.problems
    if row["kernel"].startswith("_window_attention_"):
        from vitkernels.triton.window_attention import shared_memory_bound

        kernel = item.launch.kernel
        consts = {**dict(zip(kernel.arg_names, item.launch.args)), **item.launch.kwargs}
        row["extra"]["smem_bound"] = shared_memory_bound(row["kernel"], consts, item.launch.args[0].element_size())
    row["extra"]["compile_s"] = round(time.time() - start, 2)
    row["extra"]["cpu_s"] = round(_cpu_seconds() - cpu, 2)  # ptxas included (a child process)
    return row


# Relative compile cost, to hand out the slow compiles first: with the items in table order the window-attention
# backward kernels (several times the others' compile time) came last and left the other workers idle at the end.
_KERNEL_COST = {"_window_attention_bwd_kernel": 8.0, "_window_attention_bwd_dkdv_kernel": 6.0,
                "_window_attention_fwd_kernel": 4.0}


def _compile_cost(item: Item) -> float:
    consts = item.launch.kwargs
    cost = _KERNEL_COST.get(item.launch.name, 1.0) * (1.5 if consts.get("COSINE") else 1.0)
    tile = consts.get("BLOCK_M", consts.get("BLOCK_N", 64))
    return cost * (float(consts.get("HD", 32)) * float(tile) / (32 * 64)) ** 0.5


def _compile_indexed(index: int) -> Tuple[int, Dict[str, Any]]:
    return index, _compile(index)


def compile_all(jobs: int) -> List[Dict[str, Any]]:
    """Rows of every item of ``_ITEMS``, in their order; with ``jobs`` > 1, forked workers take the costliest first."""
    if jobs <= 1:
        return [_compile(i) for i in range(len(_ITEMS))]
    order = sorted(range(len(_ITEMS)), key=lambda i: -_compile_cost(_ITEMS[i]))
    rows: List[Any] = [None] * len(_ITEMS)
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for index, row in pool.imap_unordered(_compile_indexed, order, chunksize=1):
            rows[index] = row
    return rows


def check(rows: List[Dict[str, Any]]) -> List[str]:
    """The gate's failures, one line each."""
    limits = {t.arch: t.smem_per_block for t in GATE_TARGETS}
    failures = []
    for row in rows:
        name = f"{row['backend']} {row['kernel']} [{row['config']}] {row['arch']}"
        if row["status"] != "ok":
            failures.append(f"{name}: {row['problem']}")
            continue
        bound = (row.get("extra") or {}).get("smem_bound")
        if bound is not None and row["shared_bytes"] > bound:
            failures.append(f"{name}: {row['shared_bytes']} bytes of shared memory > the dispatcher's bound {bound} "
                            "(vitkernels.triton.window_attention.shared_memory_bound)")
        limit = limits.get(row["arch"])
        if limit is not None and row["shared_bytes"] > limit:
            failures.append(f"{name}: {row['shared_bytes']} bytes of shared memory > the {row['arch']} limit {limit}")
        if row["headline"] and row["spill_bytes"]:
            failures.append(f"{name}: headline configuration spills {row['spill_bytes']} bytes")
    return failures


def cuda_rows(from_json: str = None) -> List[Dict[str, Any]]:
    """Rows of the CUDA gate (tools/compile_gate_cuda.py prints a JSON list on stdout), if it exists; read from
    ``from_json`` instead when given (the JSON .ci/cuda wrote: CI compiles the CUDA sources once)."""
    if from_json:
        with open(from_json) as f:
            return json.load(f)
    if not os.path.exists(CUDA_GATE):
        return []
    res = subprocess.run([sys.executable, CUDA_GATE], capture_output=True, text=True, cwd=ROOT)
    try:
        rows = json.loads(res.stdout)
    except json.JSONDecodeError:
        return [dict(backend="cuda", kernel="(tools/compile_gate_cuda.py)", config="", arch="", registers=None,
                     spill_bytes=None, stack_bytes=None, shared_bytes=None, tensor_core=None, headline=False,
                     status="fail", problem=f"no JSON on stdout (exit {res.returncode}): {res.stderr.strip()[-300:]}")]
    return rows


def markdown(rows: List[Dict[str, Any]], failures: List[str], seconds: float) -> str:
    import triton

    lines = [
        "# Kernel resources (ahead-of-time compile, no GPU)",
        "",
        "Regenerate with `python tools/compile_gate.py --table` (CI runs the same gate in `.ci/compile-gate`).",
        f"Triton {triton.__version__}, torch {torch.__version__}; Triton kernels compiled with "
        "`triton.compile(..., target=GPUTarget(\"cuda\", 80|90, 32))`; CUDA kernels (when present) by nvcc "
        "`-Xptxas -v`. Registers per thread, spill stores and stack frame in bytes per thread, shared memory in "
        "bytes per block (limits: sm_80 166912, sm_90 232448). `tensor core`: mma / wgmma instructions present. "
        "`SASS` (Triton): static instructions of the kernel / of its outermost loop body (per warp; for window "
        "attention the loop body is one window's work). `COSINE`: a window-attention kernel's Swin V2 (scaled "
        "cosine) variant. **bold**: headline configuration (must not spill).",
        "",
        f"{len(rows)} rows, {len(failures)} failures; {seconds:.0f} s wall, "
        f"{sum((r.get('extra') or {}).get('cpu_s', 0.0) for r in rows):.0f} s CPU.",
        "",
        "| backend | kernel | config | arch | regs | spill | stack | smem | tensor core | SASS | status | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["backend"], r["kernel"], not r["headline"], r["config"], r["arch"])  # noqa: E731
    for r in sorted(rows, key=key):
        extra = r.get("extra") or {}
        sass = f"{extra['sass_instructions']} / {extra['sass_loop_body']}" if "sass_instructions" in extra else ""
        problems = "; ".join(extra.get("problems", [])[:3]) if extra.get("problems") else (r.get("problem") or "")
        if r["status"] != "ok":
            problems = r.get("problem") or problems
        kernel = f"**{r['kernel']}**" if r["headline"] else r["kernel"]
        tc = {True: "yes", False: "no", None: ""}[r["tensor_core"]]
        lines.append(f"| {r['backend']} | {kernel} | {r['config']} | {r['arch']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['stack_bytes']} | {r['shared_bytes']} | {tc} | {sass} | "
                     f"{r['status']} | {problems.replace('|', '/')} |")
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", nargs="?", const=TABLE_PATH, default=None,
                        help=f"write the Markdown table (default path {os.path.relpath(TABLE_PATH, ROOT)})")
    parser.add_argument("--json", default=None, help="write the rows as JSON to this file")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--only", default="", help="only problems whose label contains this")
    parser.add_argument("--cuda-json", default=None,
                        help="take the CUDA rows from this JSON (tools/compile_gate_cuda.py's output) instead of "
                             "compiling the CUDA sources again")
    parser.add_argument("--no-sass", action="store_true",
                        help="skip the SASS disassembly (its instruction counts are for the table, not the gate)")
    parser.add_argument("--assemble", choices=("all", "headline"), default="all",
                        help="run ptxas for every compile (all), or only for the headline configurations, the others "
                             "stopping at LLVM IR, without LLVM's O3 pass pipeline: shared memory and compile "
                             "errors through Triton's pipeline to LLVM IR are still gated, registers and spills are "
                             "then known for the headline rows only (over half the CPU time of such a compile; "
                             "--table always assembles all)")
    parser.add_argument("--keep", default=None, help="keep PTX / SASS of every compile in this folder")
    parser.add_argument("--example-archs", default="",
                        help="comma-separated: compile the table examples (the non-headline launch configurations) "
                             "for these architectures only, e.g. sm_90 (default: every gate architecture; the "
                             "headline, extreme and benchmark problems always compile for all)")
    args = parser.parse_args(argv)
    if args.keep:
        os.environ["GATE_KEEP_DIR"] = args.keep
    _SASS[0] = not args.no_sass or bool(args.table)
    _ASSEMBLE_ALL[0] = args.assemble == "all" or bool(args.table)
    start = time.time()
    # a fresh Triton cache: a cached kernel is not compiled again, and ptxas's log is how spills are read
    with tempfile.TemporaryDirectory(prefix="vitkernels-gate-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        _ITEMS[:] = collect(args.only, tuple(a for a in args.example_archs.split(",") if a))
        assembled = len(_ITEMS) if _ASSEMBLE_ALL[0] else sum(item.headline for item in _ITEMS)
        print(f"compile gate: {len(_ITEMS)} compiles ({len(GATE_TARGETS)} architectures), {args.jobs} processes, "
              f"{assembled} through ptxas", flush=True)
        rows = compile_all(args.jobs)
    rows += cuda_rows(args.cuda_json)
    failures = check(rows)
    seconds = time.time() - start
    for row in rows:
        if row["headline"] or row["status"] != "ok":
            extra = row.get("extra") or {}
            print(f"  {row['arch']} {row['kernel']:<40} {row['config']:<48} regs {row['registers']} "
                  f"spill {row['spill_bytes']} stack {row['stack_bytes']} smem {row['shared_bytes']} "
                  f"tc {row['tensor_core']} sass {extra.get('sass_instructions')}/{extra.get('sass_loop_body')}"
                  f" {row['status']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.table:
        with open(args.table, "w") as f:
            f.write(markdown(rows, failures, seconds))
        print(f"wrote {os.path.relpath(args.table, ROOT)}")
    cpu = sum((r.get("extra") or {}).get("cpu_s", 0.0) for r in rows)
    print(f"compile gate: {len(rows)} rows, {len(failures)} failures, {seconds:.0f} s wall, {cpu:.0f} s CPU")
    for line in failures:
        print("FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
