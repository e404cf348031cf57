"""``python -m vitkernels.demo``: build a Swin stage, run it on every backend, print agreement and timings.

The stage (fast :class:`vitkernels.SwinTransformerStage`: W-MSA then SW-MSA blocks) runs with ``backend`` set to
each of ``auto``, ``triton``, ``native`` and ``reference`` in turn. Each run is compared with the float64 reference
stage holding the same weights (max |error| of the output and of the input gradient) and timed (median of
``--repeats`` runs: inference under ``torch.no_grad``, and forward + backward). A backend that cannot serve the
stage on this machine is listed with the reason.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch

import vitkernels
from vitkernels import info
from vitkernels.reference import swin as reference


def _timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 2 on CPU")
    parser.add_argument("--size", type=int, default=56, help="feature map height = width (Swin-T stage 1: 56)")
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = args.batch or (32 if device.type == "cuda" else 2)
    torch.manual_seed(0)
    config = dict(dim=args.dim, out_dim=args.dim, input_resolution=(args.size, args.size), depth=args.depth,
                  downsample=False, num_heads=args.heads, window_size=args.window)
    stage = vitkernels.SwinTransformerStage(**config).to(device=device, dtype=dtype).eval()
    ref64 = reference.SwinTransformerStage(**config).to(device=device, dtype=torch.float64).eval()
    ref64.load_state_dict(stage.state_dict())

    x = torch.randn(batch, args.size, args.size, args.dim, device=device)
    grad = torch.randn_like(x)
    x64 = x.double().requires_grad_()
    expected = ref64(x64)
    expected.backward(grad.double())

    lines = [info.report(), "", f"Swin stage demo on {device.type} ({info.versions().get('CUDA device', 'CPU')}), "
             f"{str(dtype).replace('torch.', '')}: batch {batch}, {args.size}x{args.size}x{args.dim}, "
             f"{args.heads} heads, window {args.window}, depth {args.depth} (W-MSA + SW-MSA)",
             f"{'backend':<10} {'serves with':<30} {'max|out err|':>13} {'max|dx err|':>12} "
             f"{'infer ms':>9} {'fwd+bwd ms':>11}"]
    timings = {}
    for backend in ("auto", "triton", "native", "reference"):
        stage.backend = backend
        probe = x[:1].to(dtype)
        if backend == "triton" and device.type == "cpu" and vitkernels.triton.interpreter_active():
            lines.append(f"{backend:<10} skipped: the Triton interpreter is a correctness tool (the tests use it); "
                         "far too slow for this shape")
            continue
        try:
            with torch.no_grad():
                stage(probe)
        except vitkernels.BackendUnavailableError as exc:
            reason = str(exc).splitlines()[0].split(": ", 2)[-1]
            lines.append(f"{backend:<10} unavailable: {reason}")
            continue
        chosen = _describe_choice(stage, probe) if backend == "auto" else backend
        xin = x.to(dtype, copy=True).requires_grad_()  # a copy: x itself must not collect gradients
        out = stage(xin)
        out.backward(grad.to(dtype))
        out_err = (out.double() - expected).abs().max().item()
        dx_err = (xin.grad.double() - x64.grad).abs().max().item()

        def infer():
            with torch.no_grad():
                stage(x.to(dtype))

        def train_step():
            xi = x.to(dtype, copy=True).requires_grad_()
            stage(xi).backward(grad.to(dtype))

        timings[backend] = (_timed(infer, args.repeats, device), _timed(train_step, args.repeats, device))
        lines.append(f"{backend:<10} {chosen:<30} {out_err:>13.2e} {dx_err:>12.2e} "
                     f"{timings[backend][0] * 1e3:>9.2f} {timings[backend][1] * 1e3:>11.2f}")
    if "reference" in timings:
        base = timings["reference"]
        lines.append("speedup vs reference (inference, fwd+bwd): " + ", ".join(
            f"{b} {base[0] / t[0]:.2f}x/{base[1] / t[1]:.2f}x" for b, t in timings.items() if b != "reference"))
    return "\n".join(lines)


def _describe_choice(stage, probe) -> str:
    """Which backend ``auto`` picks for each op the stage calls, e.g. 'window_attention=native'."""
    block = stage.blocks[0]
    call = vitkernels.dispatch.Call(probe.device, probe.dtype, {"window_size": list(block.window_size)})
    choice, _ = vitkernels.ops.window_attention.op.auto_choice(call)
    return f"window_attention={choice}"


def main(argv: Optional[List[str]] = None) -> int:
    print(run(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
