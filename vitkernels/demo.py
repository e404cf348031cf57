"""``python -m vitkernels.demo``: the whole Swin-T, patched with vitkernels, against timm's: agreement and timings.

What it does:

1. builds timm's ``swin_tiny_patch4_window7_224`` (random weights, ``pretrained=False``; nothing is downloaded) and a
   copy patched in place by :func:`vitkernels.compat.timm.patch_model` (same parameters, same state dict);
   where timm cannot be imported it says why and uses :class:`vitkernels.reference.SwinTransformer` instead (timm's
   arithmetic and state dict, no timm needed);
2. checks both against the unpatched model run in float64 (max |error| of the logits; for the training step, of the
   loss and relative error of the parameter gradients);
3. times inference (eval, ``no_grad``) and a training step (forward, cross-entropy, backward) of both, the two
   models alternating round by round so that a change in machine load hits both alike, and prints the median, the
   interquartile range (p25-p75) and the ratio of medians with the range the quartiles allow;
4. says when the spread is too large for the ratio to mean anything (a machine busy with other work): then run it
   again on a quiet machine, or with more ``--repeats``.

``--backend`` chooses the patched model's backend (default ``auto``: ``native`` C++ on CPU, ``triton`` on CUDA).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import vitkernels
from vitkernels import info
from vitkernels.compat.timm import patch_model

MODEL = "swin_tiny_patch4_window7_224"
NOISY = 0.10  # IQR above 10% of the median, or a ratio range that spans 1.0: too noisy to quote the ratio


def median_iqr(times: Sequence[float]) -> Tuple[float, float, float]:
    """(median, p25, p75) of ``times``."""
    if len(times) < 2:
        return times[0], times[0], times[0]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q1, q3


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def time_interleaved(fns: Sequence[Callable[[], object]], repeats: int, device: torch.device) -> List[List[float]]:
    """Seconds per call of each of ``fns``, run alternately (one warm-up each first), ``repeats`` rounds."""
    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns:
        once(fn)
    times: List[List[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))  # neither always goes first
        for i in order:
            times[i].append(once(fns[i]))
    return times


def _baseline_model():
    """(model, description): timm's Swin-T, or vitkernels' reference Swin-T where timm does not import."""
    try:
        import timm

        return timm.create_model(MODEL, pretrained=False, drop_path_rate=0.0), f"timm {timm.__version__} {MODEL}"
    except Exception as exc:  # timm missing, or its torchvision import failing beside a CPU-only torch
        from vitkernels.reference.swin import SwinTransformer

        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        print(f"note: timm is not importable ({reason}).\n"
              "      Comparing against vitkernels.reference.SwinTransformer (timm's arithmetic and state dict) "
              "instead.\n      For timm itself, install the torchvision built for your torch (see the README, "
              "Install).", file=sys.stderr)
        model = SwinTransformer(img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                                window_size=7, num_classes=1000)
        return model, "vitkernels.reference Swin-T (timm's arithmetic)"


def _ratio_line(name: str, base: Sequence[float], fast: Sequence[float]) -> Tuple[str, bool]:
    bm, b1, b3 = median_iqr(base)
    fm, f1, f3 = median_iqr(fast)
    ratio, lo, hi = bm / fm, b1 / f3, b3 / f1
    noisy = (b3 - b1) / bm > NOISY or (f3 - f1) / fm > NOISY or lo < 1.0 < hi
    line = (f"{name:<10} baseline {_fmt(bm):>9} (p25-p75 {_fmt(b1)}-{_fmt(b3)})   patched {_fmt(fm):>9} "
            f"(p25-p75 {_fmt(f1)}-{_fmt(f3)})   speedup {ratio:.2f}x (quartile range {lo:.2f}-{hi:.2f})")
    return line, noisy


def run(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 2 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default: 20 CUDA, 7 CPU)")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "triton", "reference"])
    parser.add_argument("--no-train", action="store_true", help="time inference only")
    args = parser.parse_args(argv)

    changed = vitkernels.triton.interpreter_env_changed()
    if changed is not None:
        raise SystemExit(f"vitkernels.demo: {changed}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (32 if device.type == "cuda" else 2)
    repeats = args.repeats or (20 if device.type == "cuda" else 7)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    torch.manual_seed(0)
    base, description = _baseline_model()
    base = base.to(device)
    reference64 = copy.deepcopy(base).double()
    patched = patch_model(copy.deepcopy(base), backend=None if args.backend == "auto" else args.backend)

    versions = info.versions()
    lines = ["; ".join(f"{k} {v}" for k, v in versions.items() if k in (
                 "vitkernels", "torch", "triton", "CPU threads", "CUDA device", "vitkernels._C")),
             "(python -m vitkernels.info: which backend serves each op, and why the others cannot)", "",
             f"Whole-model demo: {description}, batch {batch}, 224x224, on {device.type}"
             f"{' (' + torch.cuda.get_device_name() + ', bf16 autocast)' if device.type == 'cuda' else ' (fp32)'}; "
             f"patched with vitkernels.compat.timm.patch_model(backend={args.backend!r})"]
    x = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    # agreement with the float64 model
    for m in (base, patched, reference64):
        m.eval()
    with torch.no_grad():
        want = reference64(x.double())
        with amp:
            got_base, got_patched = base(x).double(), patched(x).double()
    lines.append(f"agreement, logits vs the float64 model: baseline max|err| {(got_base - want).abs().max():.2e}, "
                 f"patched {(got_patched - want).abs().max():.2e}")

    def infer(model):
        def call():
            with torch.no_grad(), amp:
                model(x)
        return call

    def train_step(model, inputs=x):
        params = [p for p in model.parameters() if p.requires_grad]

        def call():
            for p in params:
                p.grad = None
            with amp:
                loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            return loss
        return call

    timings = [("inference", infer(base), infer(patched))]
    if not args.no_train:
        for m in (base, patched, reference64):
            m.train()
        loss64 = train_step(reference64, x.double())()
        grads64 = [p.grad for p in reference64.parameters() if p.requires_grad]
        loss_p = train_step(patched)()
        grads = [p.grad for p in patched.parameters() if p.requires_grad]
        worst = max(((g.double() - g64).norm() / g64.norm().clamp_min(1e-30)).item() for g, g64 in zip(grads, grads64))
        loss_err = abs(loss_p.item() - loss64.item())
        lines.append(f"agreement, training step (patched vs float64): loss |err| {loss_err:.2e}, "
                     f"worst relative gradient error {worst:.2e}")
        timings.append(("train step", train_step(base), train_step(patched)))
        for m in (base, patched):
            m.eval()

    lines.append(f"timings: median of {repeats} rounds, the two models alternating; p25-p75 = interquartile range")
    noisy_any = False
    for name, fn_base, fn_patched in timings:
        if name == "train step":
            base.train()
            patched.train()
        t_base, t_patched = time_interleaved([fn_base, fn_patched], repeats, device)
        line, noisy = _ratio_line(name, t_base, t_patched)
        lines.append(line + ("   <- NOISY" if noisy else ""))
        noisy_any |= noisy
    if noisy_any:
        lines.append(f"warning: the spread of the timings (an IQR above {NOISY:.0%} of the median, or a speedup range "
                     "that spans 1.0) says this machine was busy with other work: these ratios cannot be trusted. "
                     "Run again on a quiet machine, or with more --repeats.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    print(run(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
