"""Where a whole Swin-T's CPU time goes: GEMMs vs everything else, timm vs timm patched by vitkernels.

For each model (timm ``swin_tiny_patch4_window7_224``, ``pretrained=False``, and the same model after
``vitkernels.compat.timm.patch_model``) and mode (``inference``: eval + no_grad; ``train``: forward, ``sum()``
loss, backward to every parameter, SGD step), the step runs under ``torch.profiler`` ``--steps`` times. Each op's
self CPU time is taken per step and its *minimum over the steps* kept: on a shared machine interference only adds
time, so the minimum is the closest to the op's own cost. Ops are then split into

* GEMM: ``aten::mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` / oneDNN's ``mkldnn::_linear_pointwise`` / the convolution
  kernels (the Linears, the patch-embed conv, and timm's attention matmuls), and where the patched Linears run
  vitkernels' own GEMM (``vitkernels.ops.linear.OWN_GEMM``) the ops it runs inside (``OWN_GEMM_OPS``);
* everything else: attention (the fused op, or timm's softmax + copies), norms, activations, residual adds, copies,
  the optimizer, the framework's own ops.

The patched model's blocked MLP (``vitkernels::gelu_mlp`` and its training / backward ops, Swin-T stage 1) runs its
GEMMs inside the op: the profile counts its self time as GEMM (it also holds the bias + GELU), and the floor below
replays its GEMMs as the unblocked model's full-size ``mm`` calls.

The first table gives the GEMM share of the summed self time, and the largest non-GEMM ops. The second times the
step against its GEMM floor: every GEMM the step calls (captured with a TorchDispatchMode, the same shapes and
strides), replayed alone into preallocated outputs (mm / bmm without a bias, so no broadcast copy, no allocation),
interleaved with the steps; step minus floor is what the model spends outside its GEMMs. Run from the repository
root:

    python benchmarks/profile_breakdown_cpu.py --threads 2 --batch 4 --allocator glibc \
        --out benchmarks/results/cpu_breakdown.md
    python benchmarks/profile_breakdown_cpu.py --threads 2 --batch 4 --allocator caching \
        --out benchmarks/results/cpu_breakdown-caching.md

(a few minutes each on 2 cores). ``--allocator`` runs the script in a process with glibc's default allocator or with
the caching settings of ``publish.py`` (the benchmarks' two CPU modes); without it, the allocator it was started
with. Under glibc's default the step's largest fresh tensors are page-faulted in anew every step (the GEMMs timed
alone write into preallocated outputs and never are), which shows up outside the GEMMs; the header names the mode.
Timings on a machine shared with other work are distorted (memory-bound ops most); the per-op minimum limits that
but does not remove it: read the shares from a quiet machine.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import time

import statistics
import subprocess
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402  (makes timm importable on a CPU-only torch: the tests' torchvision stub)
from publish import ALLOCATOR_VARS, GLIBC_CACHING  # noqa: E402
from vitkernels.ops import linear as linear_op  # noqa: E402

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
            "aten::convolution_backward", "aten::_convolution",
            "mkldnn::_linear_pointwise"}  # oneDNN's inner product: the patched model's Linears (vitkernels.linear)


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


# The patched model's Linears on vitkernels' own GEMM (vitkernels.ops.linear.OWN_GEMM: AVX2-only AMD CPUs): the
# products run inside vitkernels::onednn_linear_eager (forward), its C++ autograd node (backward) and
# vitkernels::cpu_gemm (compiled code), no GEMM op of their own; profiled names containing these count as GEMM (on
# the oneDNN / MKL route the first two hold only their wrapper, ~2-3 ms of a b4 step). So does the unblocked MLP
# there (vitkernels::gelu_mlp_eager, Swin-T stages 2-4: matched by MLP_OPS; its backward's C++ autograd node,
# EagerGeluMlp), whose self time holds its GEMMs and the bias + GELU (forward) / GELU derivative (backward) they
# apply as they store their tiles.
OWN_GEMM_OPS = ("onednn_linear_eager", "EagerOneDnnLinear", "cpu_gemm", "EagerGeluMlp")


def _is_gemm(name: str) -> bool:
    return name in GEMM_OPS or any(op in name for op in MLP_OPS + OWN_GEMM_OPS)


def _label(name: str) -> str:
    """Readable op names: torch.library's autograd node of a custom op (``GeneratedBackwardFor_<ns>_<op>_default``)
    holds the op's *forward* kernel time when it runs under autograd; ``...Backward`` is its backward wrapper."""
    prefix = "GeneratedBackwardFor_vitkernels_"
    if name.startswith(prefix):
        op = name[len(prefix):]
        if op.endswith("_defaultBackward"):
            return f"vk::{op[:-len('_defaultBackward')]} (backward wrapper)"
        return f"vk::{op[:-len('_default')] if op.endswith('_default') else op} (forward, under autograd)"
    return name.replace("aten::", "").replace("vitkernels::", "vk::")


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


_aten = torch.ops.aten
_CAPTURED = {_aten.addmm.default, _aten.mm.default, _aten.mm.out, _aten.bmm.default, _aten.convolution.default,
             _aten.convolution_backward.default}
# the patched model's Linears: vitkernels::onednn_linear in the forward (a custom op: the mode sees it, not the
# oneDNN call inside it), oneDNN's inner product directly in its backward
_ONEDNN = set()
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _ONEDNN.add(torch.ops.mkldnn._linear_pointwise.default)
    import vitkernels.ops.linear  # noqa: E402,F401  (registers vitkernels::onednn_linear where oneDNN exists)
    if hasattr(torch.ops.vitkernels, "onednn_linear"):
        _ONEDNN.add(torch.ops.vitkernels.onednn_linear.default)
_CAPTURED |= _ONEDNN
# the fused window attention: its two matmuls (four in the backward) are GEMMs timm runs as bmm; replayed as bmm at
# the same shapes for the floor "with the attention matmuls" (arguments: window_size at 3 (forward) / 6 (backward),
# num_heads at 5 / 8)
_ATTENTION = {}
if hasattr(torch.ops, "vitkernels"):
    import vitkernels.ops.window_attention  # noqa: E402,F401  (registers the ops' Python parts)
    for _name, _backward in (("window_attention", False), ("window_attention_add_bias", False),
                             ("window_attention_backward", True), ("window_attention_add_bias_backward", True)):
        if hasattr(torch.ops.vitkernels, _name):
            _ATTENTION[getattr(torch.ops.vitkernels, _name).default] = _backward
_CAPTURED |= set(_ATTENTION)
# the blocked MLP (vitkernels::gelu_mlp, Swin stage 1): its GEMMs run inside the op, by blocks of rows; replayed as the
# unblocked model's mm calls at full size (forward: fc1 and fc2; backward: the four gradient GEMMs). Its profiled self
# time holds those GEMMs and the bias + GELU: counted as GEMM in the profile table (MLP_OPS).
_MLP = {}
if hasattr(torch.ops, "vitkernels"):
    import vitkernels.ops.gelu_mlp  # noqa: E402,F401
    for _name, _backward in (("gelu_mlp", False), ("gelu_mlp_train", False), ("gelu_mlp_backward", True)):
        if hasattr(torch.ops.vitkernels, _name):
            _MLP[getattr(torch.ops.vitkernels, _name).default] = _backward
_CAPTURED |= set(_MLP)
MLP_OPS = ("gelu_mlp",)  # profiled names containing it: the ops and their autograd nodes


class _CaptureGemms(TorchDispatchMode):
    """Records (op, argument metadata) of every GEMM / convolution a step calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _CAPTURED:
            meta = [(tuple(a.shape), tuple(a.stride())) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, meta))
        return func(*args, **(kwargs or {}))


def _like(meta):
    shape, stride = meta
    storage = max(sum((n - 1) * st for n, st in zip(shape, stride)) + 1, 1)
    return torch.randn(storage).as_strided(shape, stride)


def _attention_matmuls(meta, backward: bool):
    """The bmm jobs of one fused window attention call: (G, N, hd) x (G, hd, N) and (G, N, N) x (G, N, hd) in the
    forward; dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q in the backward (G = windows x heads), as timm's
    unfused attention runs them."""
    (B, H, W, C3), _ = meta[1] if backward else meta[0]
    (wh, ww), heads = (meta[6], meta[8]) if backward else (meta[3], meta[5])
    N, hd = wh * ww, C3 // 3 // heads
    G = B * -(-H // wh) * -(-W // ww) * heads
    shapes = [((G, N, hd), (G, hd, N)), ((G, N, N), (G, N, hd))]
    if backward:
        shapes += [((G, N, N), (G, N, hd)), ((G, N, N), (G, N, hd))]
    return _matmul_jobs(shapes)


def _matmul_jobs(shapes, own: bool = False):
    """One job per (a shape, b shape): a @ b on random operands into a preallocated output (mm, or bmm for 3D); 2D
    products through vitkernels' own GEMM with ``own`` (which allocates its output)."""
    jobs = []
    for sa, sb in shapes:
        a, b, out = torch.randn(sa), torch.randn(sb), torch.empty(*sa[:-1], sb[-1])
        if own and len(sa) == 2:
            jobs.append(lambda a=a, b=b: torch.ops.vitkernels.cpu_gemm(a, b))
            continue
        matmul = torch.bmm if len(sa) == 3 else torch.mm
        jobs.append(lambda a=a, b=b, out=out, matmul=matmul: matmul(a, b, out=out))
    return jobs


def _mlp_matmuls(meta, backward: bool, own: bool = False):
    """The mm jobs of one blocked MLP call at full size, as the unblocked model runs them: x W1^T (M, C) x (C, H) and
    h W2^T (M, H) x (H, N) in the forward; g^T h, g W2, dpre W1, dpre^T x in the backward."""
    (*lead, C), _ = meta[1] if backward else meta[0]
    (H, _C), _ = meta[3] if backward else meta[1]
    (N, _H), _ = meta[5] if backward else meta[3]
    M = 1
    for n in lead:
        M *= n
    shapes = [((M, C), (C, H)), ((M, H), (H, N))]
    if backward:
        shapes = [((N, M), (M, H)), ((M, N), (N, H)), ((M, H), (H, C)), ((H, M), (M, C))]
    return _matmul_jobs(shapes, own)


def gemm_floor(step, attention: bool = False, own: bool = False):
    """A function running the GEMMs of one ``step`` alone, on random operands of the same shapes and strides, each
    into a preallocated output; and how many there are. With ``attention``, the fused window attention's matmuls
    too, as bmm at timm's shapes (an unpatched model's attention matmuls are bmm calls already). With ``own`` (the
    patched model where its Linears run vitkernels' own GEMM, which no dispatch mode sees: it is called from C++),
    the step is captured with the own GEMM off, so its Linears show as oneDNN / mm calls, and those are replayed
    through vitkernels' own GEMM."""
    capture = _CaptureGemms()
    own_before = linear_op.OWN_GEMM
    linear_op.OWN_GEMM = linear_op.OWN_GEMM and not own
    try:
        with capture:
            step()
    finally:
        linear_op.OWN_GEMM = own_before
    jobs = []
    for func, meta in capture.calls:
        if func in _ATTENTION:
            if attention:
                jobs += _attention_matmuls(meta, _ATTENTION[func])
            continue
        if func in _MLP:
            jobs += _mlp_matmuls(meta, _MLP[func], own)
            continue
        if func in (_aten.addmm.default, _aten.mm.default, _aten.mm.out):
            a, b = (_like(meta[1]), _like(meta[2])) if func is _aten.addmm.default else (_like(meta[0]), _like(meta[1]))
            out = torch.empty(a.shape[0], b.shape[1])
            if own:  # a patched Linear's product (the patch-embed conv and the attention are not mm calls)
                jobs.append(lambda a=a, b=b: torch.ops.vitkernels.cpu_gemm(a, b))
            else:
                jobs.append(lambda a=a, b=b, out=out: torch.mm(a, b, out=out))
        elif func is _aten.bmm.default:
            a, b = _like(meta[0]), _like(meta[1])
            out = torch.empty(a.shape[0], a.shape[1], b.shape[2])
            jobs.append(lambda a=a, b=b, out=out: torch.bmm(a, b, out=out))
        elif func in _ONEDNN:  # (rows..., K) x (N, K)^T, without the bias or the activation
            x, w = _like(meta[0]), _like(meta[1])
            x = x.reshape(-1, x.shape[-1]).contiguous()
            if own:
                jobs.append(lambda x=x, w=w.contiguous(): torch.ops.vitkernels.cpu_gemm(x, w.t()))
            else:
                jobs.append(lambda x=x, w=w.contiguous(): torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [],
                                                                                             ""))
        elif func is _aten.convolution.default:
            x, w = _like(meta[0]), _like(meta[1])
            jobs.append(lambda x=x, w=w, m=meta: _aten.convolution(x, w, None, m[3], m[4], m[5], m[6], m[7], m[8]))
        else:  # convolution_backward: the weight gradient (the patch embedding is the first layer)
            g, x, w = _like(meta[0]), _like(meta[1]), _like(meta[2])
            jobs.append(lambda g=g, x=x, w=w, m=meta: _aten.convolution_backward(g, x, w, None, m[4], m[5], m[6], m[7],
                                                                                 m[8], m[9], [False, True, False]))

    def floor():
        for job in jobs:
            job()

    return floor, len(jobs)


def cpu_label() -> str:
    """The CPU's model name, x86 family / model and widest SIMD from /proc/cpuinfo (a VM's "AMD EPYC" hides whether
    it is a Zen 4, family 25, with half-width AVX-512 FMAs, or a Zen 5, family 26: the GEMM floors differ)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return "CPU model unknown"
    flags = set(fields.get("flags", "").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{fields.get('model name', 'unknown')}, x86 family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}, {simd}")


def rerun_under_allocator(allocator: str, script: str, argv) -> int:
    """Run ``script`` with ``argv`` plus ``--allocator inherit`` in a fresh process under glibc's default allocator
    (``glibc``) or the benchmarks' glibc caching settings (``caching``: publish.py's); glibc reads them at process
    start. Returns the child's exit status."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
    if allocator == "caching":
        env.update(GLIBC_CACHING)
    child = argv if argv is not None else sys.argv[1:]
    return subprocess.run([sys.executable, os.path.abspath(script), *child, "--allocator", "inherit"],
                          env=env).returncode


def interleaved(fns, rounds):
    """name -> step times (ms), the functions run in turn for ``rounds`` rounds after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="profiled steps per model and mode (after 2 warm-ups)")
    parser.add_argument("--modes", default="inference,train")
    parser.add_argument("--top", type=int, default=8, help="non-GEMM ops listed per model and mode")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the step vs floor timing")
    parser.add_argument("--out", help="also write the markdown here")
    parser.add_argument("--allocator", choices=("inherit", "glibc", "caching"), default="inherit",
                        help="run under glibc's default allocator or the benchmarks' glibc caching settings "
                             "(default: the allocator this process was started with)")
    args = parser.parse_args(argv)
    if args.allocator != "inherit":  # glibc reads its settings at process start: run again in a fresh process
        return rerun_under_allocator(args.allocator, __file__, argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224)
    lines = [f"# Swin-T CPU time breakdown: GEMMs vs the rest (batch {args.batch}, {args.threads} threads, "
             f"per-op minimum over {args.steps} steps)", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPUs visible ({cpu_label()}); allocator: "
             f"{conftest.allocator_mode()}; self time per op, summed. Each mode in a fresh process.", ""]
    modes = args.modes.split(",")
    if len(modes) > 1:  # one process per mode: one mode's profile and floors must not shape the next one's heap
        header = len(lines)  # the child writes the same header first
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "mode.md")
                child = argv if argv is not None else sys.argv[1:]  # its later --modes / --out win
                subprocess.run([sys.executable, os.path.abspath(__file__), *child, "--modes", mode, "--out", out],
                               check=True)
                with open(out) as f:
                    lines += f.read().splitlines()[header:]
        modes = []
    for mode in modes:
        steps = {which: step_fn(build(which), mode, x) for which in ("timm", "patched")}
        for step in steps.values():
            step()
            step()
        # The step-vs-floor timing runs first, then the profile, with the floors' operands freed in between: the other
        # way round, the heap the profiled steps left behind plus the floors' preallocated operands slowed the
        # patched training step by ~15% in the timing (Swin-T b4 on an Intel Xeon: 1.12x timm instead of the
        # 1.31-1.35x of the same steps timed alone, after the profile alone, or beside the floors alone).
        fns = dict(steps)
        own = linear_op.OWN_GEMM  # the patched model's Linears on vitkernels' own GEMM: its floor replays them so
        for which, step in steps.items():
            floor, count = gemm_floor(step, own=own and which == "patched")
            fns[f"GEMM floor of {which} ({count} GEMMs)"] = floor
        floor, count = gemm_floor(steps["patched"], attention=True, own=own)
        fns[f"GEMM floor of patched+attention ({count} GEMMs, the attention's matmuls as bmm)"] = floor
        times = interleaved(fns, args.rounds)
        med = {name: statistics.median(t) for name, t in times.items()}
        timing_lines = [
            "", f"Step vs its GEMMs alone (interleaved, {args.rounds} rounds; median, in brackets the minimum). "
            "timm's floor holds its attention's matmuls (bmm); the patched model runs them inside the fused "
            "op, so its floor is given without and with them (replayed as bmm at timm's shapes):",
            "", "| | step | its GEMM floor | outside the GEMMs | share outside | speedup vs timm |",
            "|---|---:|---:|---:|---:|---:|"]
        for which in list(steps) + ["patched+attention"]:
            floor_name = next(name for name in fns if name.startswith(f"GEMM floor of {which} "))
            step_ms, floor_ms = med[which.split("+")[0]], med[floor_name]
            label = which.replace("+attention", " (floor with its attention matmuls)")
            timing_lines.append(
                f"| {label} | {step_ms:.1f} ({min(times[which.split('+')[0]]):.1f}) ms | {floor_ms:.1f} "
                f"({min(times[floor_name]):.1f}) ms [{floor_name.split('(')[1][:-1]}] | "
                f"{step_ms - floor_ms:.1f} ms | {100 * (step_ms - floor_ms) / step_ms:.0f}% | "
                f"{med['timm'] / step_ms:.2f}x |")
            print(timing_lines[-1], flush=True)
        del fns, floor
        gc.collect()
        own_note = (" and its Linears' ops (vk::onednn_linear_eager and its autograd node) and unblocked MLP's "
                    "(vk::gelu_mlp_eager and its autograd node EagerGeluMlp, stages 2-4), whose self time holds "
                    "vitkernels' own GEMM (the MLP's: with the bias + GELU, or its derivative, in its epilogues)"
                    if linear_op.OWN_GEMM else "")
        lines += [f"## {mode}", "", "Profile (self time per op, minimum over the profiled steps; the patched "
                  "model's blocked MLP ops (vk::gelu_mlp*, Swin stage 1), whose self time holds the MLP's GEMMs and "
                  f"its bias + GELU{own_note}, counted as GEMM):", "",
                  "| model | step (min, profiled) | self time | GEMM | rest | GEMM share | largest non-GEMM ops (ms) |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for which, step in steps.items():
            ops, wall = per_op_minimum(step, args.steps)
            gemm = sum(ms for name, ms in ops.items() if _is_gemm(name))
            total = sum(ops.values())
            rest = sorted(((ms, name) for name, ms in ops.items() if not _is_gemm(name)), reverse=True)[:args.top]
            listed = ", ".join(f"{_label(name)} {ms:.1f}" for ms, name in rest)
            lines.append(f"| {which} | {wall:.1f} ms | {total:.1f} ms | {gemm:.1f} ms | {total - gemm:.1f} ms | "
                         f"{100 * gemm / total:.0f}% | {listed} |")
            print(lines[-1], flush=True)
        lines += timing_lines
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
