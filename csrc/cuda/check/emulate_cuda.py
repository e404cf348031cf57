"""Run the CUDA window attention kernels (Swin V1, V2 and 3D) on the CPU, in an emulation of CUDA, against the
float64 reference.

    python csrc/cuda/check/emulate_cuda.py [--quick] [--only NAME] [--sanitize address]

The kernels have not run on a GPU yet; this runs their bodies as written: the runtime-only headers and the explicit
instantiations (csrc/cuda/*.cuh, window_attention{,_v2,_3d}_{fwd,bwd}_kernels.cu) are compiled with g++ against
csrc/cuda/check/emulate/ (a CPU stand-in for <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h>: a block's threads as
fibers, real block and warp barriers, shuffles through per-warp buffers), with every ``<<<...>>>`` launch rewritten
into a call of the emulated launcher. Three kernel sets, one build: V1 (window_attention: vitkernels/reference/
window_attention.py), V2 (window_attention_v2, cosine attention: vitkernels/reference/window_attention_v2.py) and 3D
(window_attention_3d, the V1 blocks over 3D windows: vitkernels/reference/window_attention_3d.py). The host side
mirrors the torch bindings (csrc/cuda/window_attention{,_v2,_3d}.cpp): the same outputs, scratch buffers,
windows-per-group choice (for a 132-multiprocessor GPU, and 1 and 3 windows per group) and reductions. Outputs start
as NaN, so a row a kernel fails to write is caught. What it cannot find: anything that depends on the GPU's memory
model beyond the kernels' barriers, real expf / logf / sqrtf rounding, launch-resource failures (see
tools/compile_gate_cuda.py for registers and shared memory).

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
    # the window attention instantiations only (the masking / partition kernels are not emulated)
    kernels = glob.glob(os.path.join(CUDA_DIR, "window_attention*_kernels.cu"))
    for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cuh")) + kernels):
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
    # -g1: line tables, enough for the stacks of a crash or an AddressSanitizer report, in three quarters of -g's
    # build time (32 vs 43 s here); -O0 builds in 22 s but runs the cases twice as long (same total)
    flags = ["-std=c++20", "-O1", "-g1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unused-function",
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
    """The torch bindings' host code (csrc/cuda/window_attention.cpp, window_attention_v2.cpp) around the emulated
    launchers. ``scale`` is V1's float or V2's (nH) tensor tau, as in the ops' schemas: it picks the kernel set."""

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
        self.lib.vk_emu_window_attention_chunks.restype = i64
        self.lib.vk_emu_window_attention_chunks.argtypes = [ctypes.c_void_p]
        self.lib.vk_emu_window_attention_v2_fwd.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 7
        self.lib.vk_emu_window_attention_v2_bwd.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [i64]
        self.lib.vk_emu_window_attention_3d_fwd.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_double]
        self.lib.vk_emu_window_attention_3d_bwd.argtypes = (
            [ctypes.c_int] + [ctypes.c_void_p] * 11 + [ctypes.c_double, i64])
        self.lib.vk_emu_window_attention_3d_bias_grad.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [i64] * 4
        self.lib.vk_emu_window_attention_3d_pad_partials.restype = i64
        self.lib.vk_emu_window_attention_3d_pad_partials.argtypes = [ctypes.c_void_p, i64]

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
        return self.torch.zeros(qkv.shape[-1], dtype=qkv.dtype)

    def forward(self, qkv, table, qkv_bias, window, shift, nH, scale):
        torch = self.torch
        acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        windows, N, hd = self._geometry(qkv, window, nH)
        pad_row = self._pad_row(qkv, qkv_bias)
        out = torch.full(qkv.shape[:3] + (nH * hd,), float("nan"), dtype=qkv.dtype)
        lse = torch.full((windows, nH, N), float("nan"), dtype=acc)
        tab = table.to(acc).contiguous()
        code, dims = self.DTYPE_CODE[qkv.dtype], self._dims(qkv, window, shift, nH)
        if torch.is_tensor(scale):  # V2
            tau = scale.to(acc).contiguous()
            rc = self.lib.vk_emu_window_attention_v2_fwd(code, self._ptr(qkv), self._ptr(pad_row), self._ptr(tab),
                                                         self._ptr(tau), self._ptr(out), self._ptr(lse), dims)
        else:
            rc = self.lib.vk_emu_window_attention_fwd(code, self._ptr(qkv), self._ptr(pad_row), self._ptr(tab),
                                                      self._ptr(out), self._ptr(lse), dims, scale)
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
        code, grad_scale = self.DTYPE_CODE[qkv.dtype], None
        if torch.is_tensor(scale):  # V2: d tau partials per (window, head, chunk), summed here
            tau = scale.to(acc).contiguous()
            d_scale = torch.full((windows, nH, self.lib.vk_emu_window_attention_chunks(dims)), float("nan"), dtype=acc)
            rc = self.lib.vk_emu_window_attention_v2_bwd(
                code, self._ptr(grad_out), self._ptr(qkv), self._ptr(pad_row), self._ptr(tab), self._ptr(tau),
                self._ptr(out), self._ptr(lse), self._ptr(delta), self._ptr(grad_qkv), self._ptr(d_scale),
                self._ptr(d_bias), self._ptr(d_pad), dims, windows_per_group)
            grad_scale = d_scale.sum((0, 2), dtype=torch.float64).to(scale.dtype)
        else:
            rc = self.lib.vk_emu_window_attention_bwd(
                code, self._ptr(grad_out), self._ptr(qkv), self._ptr(pad_row), self._ptr(tab), self._ptr(out),
                self._ptr(lse), self._ptr(delta), self._ptr(grad_qkv), self._ptr(d_bias), self._ptr(d_pad), dims,
                scale, windows_per_group)
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
        return grad_qkv, grad_table.to(table.dtype), grad_scale, grad_bias

    # --- 3D (csrc/cuda/window_attention_3d.cpp): qkv (B, D, H, W, 3C), window / shift triples -----------------------

    def _dims_3d(self, qkv, window, shift, pad_before_shift, nH):
        B, D, H, W, three_c = qkv.shape
        return (ctypes.c_int64 * 13)(B, D, H, W, *window, *shift, int(pad_before_shift), nH, three_c // (3 * nH))

    @staticmethod
    def _windows_3d(qkv, window):
        return qkv.shape[0] * math.prod(math.ceil(n / w) for n, w in zip(qkv.shape[1:4], window))

    def forward_3d(self, qkv, table, qkv_bias, window, shift, pad_before_shift, nH, scale):
        torch = self.torch
        acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        hd = qkv.shape[4] // (3 * nH)
        pad_row = self._pad_row(qkv, qkv_bias)
        out = torch.full(qkv.shape[:4] + (nH * hd,), float("nan"), dtype=qkv.dtype)
        lse = torch.full((self._windows_3d(qkv, window), nH, math.prod(window)), float("nan"), dtype=acc)
        tab = table.to(acc).contiguous()
        rc = self.lib.vk_emu_window_attention_3d_fwd(
            self.DTYPE_CODE[qkv.dtype], self._ptr(qkv), self._ptr(pad_row), self._ptr(tab), self._ptr(out),
            self._ptr(lse), self._dims_3d(qkv, window, shift, pad_before_shift, nH), scale)
        if rc != 0:
            raise RuntimeError(f"emulated 3D forward launch failed: {rc}")
        return out, lse

    def backward_3d(self, grad_out, qkv, table, qkv_bias, out, lse, window, shift, pad_before_shift, nH, scale,
                    windows_per_group):
        torch = self.torch
        acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        windows, N, hd = self._windows_3d(qkv, window), math.prod(window), qkv.shape[4] // (3 * nH)
        C = nH * hd
        dims = self._dims_3d(qkv, window, shift, pad_before_shift, nH)
        pad_row = self._pad_row(qkv, qkv_bias)
        grad_qkv = torch.full(qkv.shape, float("nan"), dtype=qkv.dtype)
        delta = torch.full((windows, nH, N), float("nan"), dtype=acc)
        d_bias = torch.zeros((math.ceil(windows / windows_per_group), nH, N, N), dtype=acc)
        d_pad = torch.full((self.lib.vk_emu_window_attention_3d_pad_partials(dims, windows_per_group), nH, 2, hd),
                           float("nan"), dtype=acc)
        tab = table.to(acc).contiguous()
        rc = self.lib.vk_emu_window_attention_3d_bwd(
            self.DTYPE_CODE[qkv.dtype], self._ptr(grad_out), self._ptr(qkv), self._ptr(pad_row), self._ptr(tab),
            self._ptr(out), self._ptr(lse), self._ptr(delta), self._ptr(grad_qkv), self._ptr(d_bias),
            self._ptr(d_pad), dims, scale, windows_per_group)
        if rc != 0:
            raise RuntimeError(f"emulated 3D backward launch failed: {rc}")
        d_bias_sum = d_bias.sum(0, dtype=torch.float64).contiguous()
        grad_table = torch.full(table.shape, float("nan"), dtype=torch.float64)
        rc = self.lib.vk_emu_window_attention_3d_bias_grad(self._ptr(d_bias_sum), self._ptr(grad_table), *window, nH)
        if rc != 0:
            raise RuntimeError(f"emulated 3D bias-gradient launch failed: {rc}")
        d_pad_sum = d_pad.sum(0, dtype=torch.float64)
        grad_bias = None
        if qkv_bias is not None:
            grad_bias = torch.cat([torch.zeros(C, dtype=torch.float64), d_pad_sum[:, 0].reshape(C),
                                   d_pad_sum[:, 1].reshape(C)]).to(qkv_bias.dtype)
        return grad_qkv, grad_table.to(table.dtype), None, grad_bias

    def windows_per_group(self, windows, nH, multiprocessors=132):
        return self.lib.vk_emu_window_attention_windows_per_group(windows, nH, 4 * multiprocessors)


# (name, op, B, H, W, window, shift, heads, head_dim, dtypes): for each kernel set every slice count G (head_dim <= 32,
# 64, 128), padding, shifts on one or both axes, a non-square window, row chunks (N * G > 256: ws 12 hd 48, ws 16 hd
# 96 / 128); V2 also the headline windows 8 / 12 / 16 and a head at the clamp of its scale (tau = 100).
CASES = [
    ("ws7 shifted padded hd32", "v1", 2, 9, 10, (7, 7), (3, 3), 3, 32, ("float32", "float16", "bfloat16", "float64")),
    ("ws7 hd64", "v1", 1, 14, 7, (7, 7), (0, 0), 2, 64, ("float16", "bfloat16")),
    ("ws12 shifted hd48 (2 chunks)", "v1", 1, 13, 12, (12, 12), (6, 6), 2, 48, ("float32", "bfloat16")),
    ("ws6x8 shift-h padded hd16", "v1", 1, 13, 17, (6, 8), (3, 0), 2, 16, ("float32",)),
    ("ws16 hd128 (4 chunks)", "v1", 1, 16, 16, (16, 16), (0, 0), 1, 128, ("float32",)),
    ("v2 ws8 shifted padded hd32", "v2", 1, 9, 10, (8, 8), (4, 4), 2, 32,
     ("float32", "float16", "bfloat16", "float64")),
    ("v2 ws3x4 shifted padded hd20", "v2", 2, 5, 11, (3, 4), (1, 2), 2, 20, ("float64",)),
    ("v2 ws12 shifted hd48 (2 chunks)", "v2", 1, 13, 12, (12, 12), (6, 6), 1, 48, ("float32", "bfloat16")),
    ("v2 ws16 shifted hd96 (4 chunks)", "v2", 1, 16, 16, (16, 16), (8, 8), 1, 96, ("float32",)),
]
# 3D (name, B, (D, H, W), window, shift, pad_before_shift, heads, head_dim, qkv_bias given, dtypes): both padding
# orders, D / H / W not multiples of the window, shifts on one, two and three axes, with and without a qkv bias;
# MONAI's 7x7x7 (343 tokens: 2 row chunks; its 2197-row table staged for head_dim <= 64, read in global memory at
# head_dim 96) and Video Swin's 8x7x7 (392 tokens), a small 2x3x2 window.
CASES_3D = [
    ("3d ws7x7x7 shift3 pad-first hd32", 1, (7, 9, 8), (7, 7, 7), (3, 3, 3), True, 1, 32, True,
     ("float32", "float16", "bfloat16")),
    ("3d ws8x7x7 shift-dw pad-after hd16", 1, (10, 7, 9), (8, 7, 7), (4, 0, 3), False, 1, 16, False, ("float32",)),
    ("3d ws2x3x2 shift-dhw pad-first hd20", 2, (3, 5, 3), (2, 3, 2), (1, 2, 1), True, 2, 20, True,
     ("float64", "float32")),
    ("3d ws2x3x2 shift-dhw pad-after hd20", 2, (3, 5, 3), (2, 3, 2), (1, 2, 1), False, 2, 20, True,
     ("float64", "bfloat16")),
    ("3d ws3x2x4 shift-h pad-after hd48 no-bias", 1, (4, 5, 7), (3, 2, 4), (0, 1, 0), False, 2, 48, False,
     ("float32",)),
    ("3d ws7x7x7 hd96 (table in global memory)", 1, (7, 7, 7), (7, 7, 7), (0, 0, 3), True, 1, 96, True,
     ("float32",)),
]
QUICK = {"ws7 shifted padded hd32", "ws12 shifted hd48 (2 chunks)", "v2 ws8 shifted padded hd32",
         "3d ws2x3x2 shift-dhw pad-first hd20"}
# fp64 / fp32: max error relative to max(1, max |reference|). Half storage (fp32 math): flash-attn's rule, as the
# tests: within 2 x eager PyTorch's own error in that dtype + 1e-3 of the magnitude.
TOLERANCE = {"float64": 1e-9, "float32": 2e-5}
HALF_ERROR_RATIO, HALF_ATOL = 2.0, 1e-3


def bias_parts(grad_bias, C):
    """The qkv bias's gradient as its q, k and v parts, compared apart (V2's padded zero keys' k gradients are ~ tau /
    eps); None (the reference did not use the bias: no padding) as zeros."""
    import torch

    if grad_bias is None:
        grad_bias = torch.zeros(3 * C, dtype=torch.float64)
    return {f"grad_bias[{part}]": grad_bias[i * C:(i + 1) * C] for i, part in enumerate("qkv")}


def reference_case(torch, op, B, H, W, window, shift, nH, hd, dtype, seed):
    """Inputs rounded to `dtype`, the float64 reference on those rounded values and, for half dtypes, eager PyTorch's
    reference in that dtype (parameters in fp32, as under AMP): (qkv, table, qkv_bias, grad_out, scale), reference,
    eager, each a dict: out, grad_qkv, grad_table, grad_scale (None for V1), grad_bias[q / k / v]. V1: scale =
    hd^-0.5; V2: tau (nH) in (1, 100) with the last head at the clamp, table in (0, 16) (16 sigmoid) and, for fp32 /
    fp64, the k part of the qkv bias zero (timm's k_bias: padded keys are zero rows, F.normalize's eps branch; their k
    gradients ~ tau / eps are beyond fp16's range in any implementation, so half dtypes get a random k bias, as in the
    tests)."""
    g = torch.Generator().manual_seed(seed)
    C = nH * hd
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    half = dtype in (torch.float16, torch.bfloat16)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    qkv = torch.randn(B, H, W, 3 * C, generator=g).to(dtype)
    qkv_bias = 0.5 * torch.randn(3 * C, generator=g)
    grad_out = torch.randn(B, H, W, C, generator=g).to(dtype)
    if op == "v1":
        from vitkernels.reference.window_attention import window_attention

        table = (0.5 * torch.randn(rows, nH, generator=g)).to(param_dtype)
        scale = hd ** -0.5

        def reference(qkv_, table_, scale_, bias_):
            return window_attention(qkv_, table_, window, shift, nH, scale_, qkv_bias=bias_)
    else:
        from vitkernels.reference.window_attention_v2 import window_attention_v2

        table = (16 * torch.rand(rows, nH, generator=g)).to(param_dtype)
        scale = torch.exp(torch.rand(nH, generator=g, dtype=torch.float64) * math.log(100))
        scale[-1] = 100.0
        scale = scale.to(param_dtype)
        if not half:
            qkv_bias[C:2 * C] = 0

        def reference(qkv_, table_, scale_, bias_):
            return window_attention_v2(qkv_, table_, scale_, window, shift, nH, qkv_bias=bias_)
    qkv_bias = qkv_bias.to(dtype)

    def run(cast):
        leaves = [cast(x).requires_grad_() for x in (qkv, table, qkv_bias)]
        tau = cast(scale).requires_grad_() if op == "v2" else scale
        out = reference(leaves[0], leaves[1], tau, leaves[2])
        out.backward(cast(grad_out))
        return dict(out=out.detach(), grad_qkv=leaves[0].grad, grad_table=leaves[1].grad,
                    grad_scale=tau.grad if op == "v2" else None, **bias_parts(leaves[2].grad, C))

    ref = run(lambda x: x.double() if torch.is_tensor(x) else x)
    eager = run(lambda x: x.clone() if torch.is_tensor(x) else x) if half else None
    return (qkv, table, qkv_bias, grad_out, scale), ref, eager


def reference_case_3d(torch, B, size, window, shift, pad_before_shift, nH, hd, with_bias, dtype, seed):
    """reference_case for the 3D op (vitkernels/reference/window_attention_3d.py): qkv (B, D, H, W, 3C), scale =
    hd^-0.5, the qkv bias or None."""
    from vitkernels.reference.window_attention_3d import window_attention_3d

    g = torch.Generator().manual_seed(seed)
    C = nH * hd
    rows = math.prod(2 * w - 1 for w in window)
    half = dtype in (torch.float16, torch.bfloat16)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    qkv = torch.randn(B, *size, 3 * C, generator=g).to(dtype)
    qkv_bias = (0.5 * torch.randn(3 * C, generator=g)).to(dtype) if with_bias else None
    grad_out = torch.randn(B, *size, C, generator=g).to(dtype)
    table = (0.5 * torch.randn(rows, nH, generator=g)).to(param_dtype)
    scale = hd ** -0.5

    def run(cast):
        leaves = [cast(x).requires_grad_() for x in (qkv, table, qkv_bias) if x is not None]
        bias = leaves[2] if with_bias else None
        out = window_attention_3d(leaves[0], leaves[1], window, shift, nH, scale, bias,
                                  pad_before_shift=pad_before_shift)
        out.backward(cast(grad_out))
        return dict(out=out.detach(), grad_qkv=leaves[0].grad, grad_table=leaves[1].grad, grad_scale=None,
                    **bias_parts(bias.grad if with_bias else None, C))

    ref = run(lambda x: x.double())
    eager = run(lambda x: x.clone()) if half else None
    return (qkv, table, qkv_bias, grad_out, scale), ref, eager


def compare(name, got, want, tol, eager=None):
    """(max error / its bound, None or what is wrong) of `got` against the float64 `want`. With `eager` (half dtypes):
    flash-attn's rule, else max error <= tol * max(1, max |want|)."""
    got = got.double()
    if not torch_isfinite_all(got):
        return math.inf, f"{name}: non-finite values (a row not written?)"
    err = (got - want).abs().max().item()
    magnitude = max(1.0, want.abs().max().item())
    if eager is None:
        bound = tol * magnitude
        return err / bound, None if err <= bound else f"{name}: max error {err:.3g} > {bound:.3g}"
    eager_err = (eager.double() - want).abs().max().item()
    bound = HALF_ERROR_RATIO * eager_err + HALF_ATOL * magnitude
    problem = f"{name}: max error {err:.3g} > {HALF_ERROR_RATIO} x eager {eager_err:.3g} (+atol)"
    return err / bound, None if err <= bound else problem


def torch_isfinite_all(t):
    import torch

    return bool(torch.isfinite(t).all())


def check_case(emu, name, dtype_name, inputs, ref, eager, nH, hd, forward, backward):
    """Runs one configuration: forward(qkv, table, qkv_bias, scale) -> (out, lse), then backward(grad_out, qkv, table,
    qkv_bias, out, lse, scale, windows_per_group) -> (grad_qkv, grad_table, grad_scale or None, grad_bias or None) for
    the windows-per-group choice of a 132-multiprocessor GPU, 1 and 3; prints a line, returns whether it failed."""
    t1 = time.time()
    qkv, table, qkv_bias, grad_out, scale = inputs
    tol = TOLERANCE.get(dtype_name)
    out, lse = forward(qkv, table, qkv_bias, scale)
    checks = [compare("out", out, ref["out"], tol, eager and eager["out"])]
    if not torch_isfinite_all(lse):
        checks.append((math.inf, "lse: non-finite values"))
    windows = lse.shape[0]
    for per_group in sorted({emu.windows_per_group(windows, nH), 1, min(3, windows)}):
        dq, dt, ds, db = backward(grad_out, qkv, table, qkv_bias, out, lse, scale, per_group)
        got = dict(grad_qkv=dq, grad_table=dt, grad_scale=ds, **bias_parts(db, nH * hd))
        checks += [compare(f"{key} (windows/group {per_group})", value, ref[key], tol, eager and eager[key])
                   for key, value in got.items() if value is not None]
    problems = [p for _, p in checks if p]
    status = f"ok (worst error {max(r for r, _ in checks):.2f} of its bound)"
    if problems:
        status = "FAIL " + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
    print(f"  {name:42s} {dtype_name:9s} {status} ({time.time() - t1:.1f} s)", flush=True)
    return bool(problems)


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
        for seed, (name, op, B, H, W, window, shift, nH, hd, dtypes) in enumerate(CASES):
            if (quick and name not in QUICK) or (only and only not in name):
                continue
            for dtype_name in dtypes:
                inputs, ref, eager = reference_case(torch, op, B, H, W, window, shift, nH, hd,
                                                    getattr(torch, dtype_name), seed)
                failures += check_case(
                    emu, name, dtype_name, inputs, ref, eager, nH, hd,
                    lambda qkv, table, bias, scale: emu.forward(qkv, table, bias, window, shift, nH, scale),
                    lambda go, qkv, table, bias, out, lse, scale, per_group: emu.backward(
                        go, qkv, table, bias, out, lse, window, shift, nH, scale, per_group))
        for seed, (name, B, size, window, shift, pad_first, nH, hd, with_bias, dtypes) in enumerate(CASES_3D, 100):
            if (quick and name not in QUICK) or (only and only not in name):
                continue
            for dtype_name in dtypes:
                inputs, ref, eager = reference_case_3d(torch, B, size, window, shift, pad_first, nH, hd, with_bias,
                                                       getattr(torch, dtype_name), seed)
                failures += check_case(
                    emu, name, dtype_name, inputs, ref, eager, nH, hd,
                    lambda qkv, table, bias, scale: emu.forward_3d(qkv, table, bias, window, shift, pad_first, nH,
                                                                   scale),
                    lambda go, qkv, table, bias, out, lse, scale, per_group: emu.backward_3d(
                        go, qkv, table, bias, out, lse, window, shift, pad_first, nH, scale, per_group))
        print(f"emulate_cuda: {failures} failing configuration(s), {time.time() - t0:.0f} s", flush=True)
        return 1 if failures else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three configurations only")
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
