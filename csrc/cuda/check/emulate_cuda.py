"""Run the CUDA window attention kernels on the CPU, in an emulation of CUDA, against the float64 reference.

    python csrc/cuda/check/emulate_cuda.py [--quick] [--only NAME] [--sanitize address]

The kernels have not run on a GPU yet; this runs their bodies as written: the runtime-only headers and the explicit
instantiations (csrc/cuda/window_attention*.cuh, window_attention_{fwd,bwd}_kernels.cu) are compiled with g++ against
csrc/cuda/check/emulate/ (a CPU stand-in for <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h>: one std::thread per
CUDA thread, real block and warp barriers, shuffles through per-warp buffers), with every ``<<<...>>>`` launch
rewritten into a call of the emulated launcher. The host side mirrors the torch binding (csrc/cuda/window_attention.cu):
the same outputs, scratch buffers, windows-per-group choice (for a 132-multiprocessor GPU, and 1 and 3 windows per
group) and reductions. Outputs start as NaN, so a row a kernel fails to write is caught. What it cannot find: anything
that depends on the GPU's memory model beyond the kernels' barriers, real expf / logf rounding, launch-resource
failures (see tools/compile_gate_cuda.py for registers and shared memory).

Exits 1 on a mismatch. ``--sanitize address`` builds with AddressSanitizer (out-of-bounds reads or writes of the
kernels abort the run; the script re-executes itself with libasan preloaded).
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;(){}]*?>)?)<<<(.*?)>>>\(", re.S)


def rewrite_launches(text):
    """``kernel<T><<<grid, block, smem, stream>>>(args`` -> ``::vk_emu::launch(grid, block, smem, stream, kernel<T>,
    args``."""
    return LAUNCH.sub(lambda m: f"::vk_emu::launch({m.group(2).strip()}, {m.group(1)}, ", text)


def build(workdir, sanitize=None):
    src = os.path.join(workdir, "src")
    os.makedirs(src, exist_ok=True)
    units = []
    for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cuh")) + glob.glob(os.path.join(CUDA_DIR, "*_kernels.cu"))):
        with open(path) as f:
            text = rewrite_launches(f.read())
        out = os.path.join(src, os.path.basename(path).replace(".cu", ".cpp") if path.endswith(".cu") else
                           os.path.basename(path))
        with open(out, "w") as f:
            f.write(text)
        if out.endswith(".cpp"):
            units.append(out)
    units.append(os.path.join(HERE, "emulate_window_attention.cpp"))
    lib = os.path.join(workdir, "libvk_emu.so")
    cxx = os.environ.get("CXX", "g++")
    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unused-function",
             "-I", src, "-I", os.path.join(HERE, "emulate"), "-I", os.path.join(ROOT, "csrc", "include")]
    if sanitize:
        flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
    cmd = [cxx] + flags + units + ["-o", lib]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit("emulate_cuda: the emulation build failed")
    return lib


class Emulated:
    """The torch binding's host code (csrc/cuda/window_attention.cu) around the emulated launchers."""

    DTYPE_CODE = None

    def __init__(self, lib_path):
        import torch

        self.torch = torch
        self.lib = ctypes.CDLL(lib_path)
        self.DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
        i64 = ctypes.c_int64
        self.lib.vk_emu_window_attention_windows_per_group.restype = i64
        self.lib.vk_emu_window_attention_windows_per_group.argtypes = [i64, i64, i64]
        self.lib.vk_emu_window_attention_pad_partials.restype = i64
        self.lib.vk_emu_window_attention_pad_partials.argtypes = [ctypes.c_void_p, i64]
        self.lib.vk_emu_window_attention_fwd.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_double]
        self.lib.vk_emu_window_attention_bwd.argtypes = (
            [ctypes.c_int] + [ctypes.c_void_p] * 11 + [ctypes.c_double, i64])
        self.lib.vk_emu_window_attention_bias_grad.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64]

    def _dims(self, qkv, window, shift, nH):
        B, H, W, three_c = qkv.shape
        dims = (ctypes.c_int64 * 9)(B, H, W, window[0], window[1], shift[0], shift[1], nH, three_c // (3 * nH))
        return dims

    @staticmethod
    def _ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    def _geometry(self, qkv, window, nH):
        B, H, W, three_c = qkv.shape
        windows = B * math.ceil(H / window[0]) * math.ceil(W / window[1])
        return windows, window[0] * window[1], three_c // (3 * nH)

    def _pad_row(self, qkv, qkv_bias):  # window_attention_pad_row: the qkv bias in qkv's dtype, or zeros
        if qkv_bias is not None:
            return qkv_bias.to(qkv.dtype).contiguous()
        return self.torch.zeros(qkv.shape[3], dtype=qkv.dtype)

    def forward(self, qkv, table, qkv_bias, window, shift, nH, scale):
        torch = self.torch
        acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        windows, N, hd = self._geometry(qkv, window, nH)
        pad_row = self._pad_row(qkv, qkv_bias)
        out = torch.full(qkv.shape[:3] + (nH * hd,), float("nan"), dtype=qkv.dtype)
        lse = torch.full((windows, nH, N), float("nan"), dtype=acc)
        tab = table.to(acc).contiguous()
        rc = self.lib.vk_emu_window_attention_fwd(self.DTYPE_CODE[qkv.dtype], self._ptr(qkv), self._ptr(pad_row),
                                                  self._ptr(tab), self._ptr(out), self._ptr(lse),
                                                  self._dims(qkv, window, shift, nH), scale)
        if rc != 0:
            raise RuntimeError(f"emulated forward launch failed: {rc}")
        return out, lse

    def backward(self, grad_out, qkv, table, qkv_bias, out, lse, window, shift, nH, scale, windows_per_group):
        torch = self.torch
        acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        windows, N, hd = self._geometry(qkv, window, nH)
        C = nH * hd
        dims = self._dims(qkv, window, shift, nH)
        pad_row = self._pad_row(qkv, qkv_bias)
        grad_qkv = torch.full(qkv.shape, float("nan"), dtype=qkv.dtype)
        groups = math.ceil(windows / windows_per_group)
        delta = torch.full((windows, nH, N), float("nan"), dtype=acc)
        d_bias = torch.zeros((groups, nH, N, N), dtype=acc)
        d_pad = torch.full((self.lib.vk_emu_window_attention_pad_partials(dims, windows_per_group), nH, 2, hd),
                           float("nan"), dtype=acc)
        tab = table.to(acc).contiguous()
        rc = self.lib.vk_emu_window_attention_bwd(
            self.DTYPE_CODE[qkv.dtype], self._ptr(grad_out), self._ptr(qkv), self._ptr(pad_row), self._ptr(tab),
            self._ptr(out), self._ptr(lse), self._ptr(delta), self._ptr(grad_qkv), self._ptr(d_bias),
            self._ptr(d_pad), dims, scale, windows_per_group)
        if rc != 0:
            raise RuntimeError(f"emulated backward launch failed: {rc}")
        d_bias_sum = d_bias.sum(0, dtype=torch.float64).contiguous()
        grad_table = torch.full(table.shape, float("nan"), dtype=torch.float64)
        rc = self.lib.vk_emu_window_attention_bias_grad(self._ptr(d_bias_sum), self._ptr(grad_table), window[0],
                                                        window[1], nH)
        if rc != 0:
            raise RuntimeError(f"emulated bias-gradient launch failed: {rc}")
        d_pad_sum = d_pad.sum(0, dtype=torch.float64)
        grad_bias = None
        if qkv_bias is not None:
            grad_bias = torch.cat([torch.zeros(C, dtype=torch.float64), d_pad_sum[:, 0].reshape(C),
                                   d_pad_sum[:, 1].reshape(C)]).to(qkv_bias.dtype)
        return grad_qkv, grad_table.to(table.dtype), grad_bias

    def windows_per_group(self, windows, nH, multiprocessors=132):
        return self.lib.vk_emu_window_attention_windows_per_group(windows, nH, 4 * multiprocessors)


# (name, B, H, W, window, shift, heads, head_dim, dtypes): every slice count G (head_dim <= 32, 64, 128), padding,
# shifts on one or both axes, a non-square window, row chunks (N * G > 256: ws 12 hd 48, ws 16 hd 128).
CASES = [
    ("ws7 shifted padded hd32", 2, 9, 10, (7, 7), (3, 3), 3, 32, ("float32", "float16", "bfloat16", "float64")),
    ("ws7 hd64", 1, 14, 7, (7, 7), (0, 0), 2, 64, ("float16", "bfloat16")),
    ("ws12 shifted hd48 (2 chunks)", 1, 13, 12, (12, 12), (6, 6), 2, 48, ("float32", "bfloat16")),
    ("ws6x8 shift-h padded hd16", 1, 13, 17, (6, 8), (3, 0), 2, 16, ("float32",)),
    ("ws16 hd128 (4 chunks)", 1, 16, 16, (16, 16), (0, 0), 1, 128, ("float32",)),
]
QUICK = {"ws7 shifted padded hd32", "ws12 shifted hd48 (2 chunks)"}
TOLERANCE = {"float64": 1e-9, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}  # relative to max |reference|


def reference_case(torch, B, H, W, window, shift, nH, hd, dtype, seed):
    from vitkernels.reference.window_attention import window_attention

    g = torch.Generator().manual_seed(seed)
    C = nH * hd
    qkv = torch.randn(B, H, W, 3 * C, generator=g).to(dtype)
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 parameters under AMP
    table = (0.5 * torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), nH, generator=g)).to(table_dtype)
    qkv_bias = (0.5 * torch.randn(3 * C, generator=g)).to(dtype)
    grad_out = torch.randn(B, H, W, C, generator=g).to(dtype)
    scale = hd ** -0.5
    q64, t64, b64 = (x.double().requires_grad_() for x in (qkv, table, qkv_bias))
    ref = window_attention(q64, t64, window, shift, nH, scale, qkv_bias=b64)
    ref.backward(grad_out.double())
    return (qkv, table, qkv_bias, grad_out, scale), (ref.detach(), q64.grad, t64.grad, b64.grad)


def compare(name, got, want, tol):
    got = got.double()
    if want is None:  # an input the reference did not use (no padding: the qkv bias): its gradient is zero
        want = got.new_zeros(got.shape)
    if not torch_isfinite_all(got):
        return f"{name}: non-finite values (a row not written?)"
    err = (got - want).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    return None if err <= bound else f"{name}: max error {err:.3g} > {bound:.3g}"


def torch_isfinite_all(t):
    import torch

    return bool(torch.isfinite(t).all())


def run(quick=False, sanitize=None, only=None):
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    workdir = tempfile.mkdtemp(prefix="vitkernels_emulate_")
    try:
        lib = build(workdir, sanitize)
        print(f"emulate_cuda: built in {time.time() - t0:.0f} s", flush=True)
        emu = Emulated(lib)
        failures = 0
        for seed, (name, B, H, W, window, shift, nH, hd, dtypes) in enumerate(CASES):
            if (quick and name not in QUICK) or (only and only not in name):
                continue
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                t1 = time.time()
                (qkv, table, qkv_bias, grad_out, scale), (ref, gq, gt, gb) = reference_case(
                    torch, B, H, W, window, shift, nH, hd, dtype, seed)
                out, lse = emu.forward(qkv, table, qkv_bias, window, shift, nH, scale)
                tol = TOLERANCE[dtype_name]
                problems = [compare("out", out, ref, tol)]
                if not torch_isfinite_all(lse):
                    problems.append("lse: non-finite values")
                windows = lse.shape[0]
                for per_group in sorted({emu.windows_per_group(windows, nH), 1, min(3, windows)}):
                    dq, dt, db = emu.backward(grad_out, qkv, table, qkv_bias, out, lse, window, shift, nH, scale,
                                              per_group)
                    problems += [compare(f"grad_qkv (windows/group {per_group})", dq, gq, tol),
                                 compare(f"grad_table (windows/group {per_group})", dt, gt, tol),
                                 compare(f"grad_bias (windows/group {per_group})", db, gb, tol)]
                problems = [p for p in problems if p]
                failures += bool(problems)
                status = "ok"
                if problems:
                    status = "FAIL " + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
                print(f"  {name:32s} {dtype_name:9s} {status} ({time.time() - t1:.1f} s)", flush=True)
        print(f"emulate_cuda: {failures} failing configuration(s), {time.time() - t0:.0f} s", flush=True)
        return 1 if failures else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two configurations only")
    parser.add_argument("--sanitize", choices=["address"], help="build with a sanitizer")
    parser.add_argument("--only", help="the configurations whose name contains this")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    if args.sanitize == "address" and "VK_EMU_ASAN" not in os.environ:
        libasan = subprocess.run([os.environ.get("CXX", "g++"), "-print-file-name=libasan.so"], capture_output=True,
                                 text=True).stdout.strip()
        env = dict(os.environ, VK_EMU_ASAN="1", LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0")
        return subprocess.call([sys.executable] + sys.argv, env=env)
    return run(args.quick, args.sanitize, args.only)


if __name__ == "__main__":
    sys.exit(main())
