"""Run the Swin V2 CUDA kernels (csrc/cuda/window_attention_v2.cuh) on the CPU in the emulation of CUDA of
csrc/cuda/check/emulate/ (a block's threads as fibers, real barriers and shuffles; see emulate_cuda.py), against the
float64 reference, with the host side of csrc/cuda/window_attention_v2.cu:

    python csrc/cuda/check/emulate_window_attention_v2.py

Cases: head_dim 32 / 20 / 48 / 96 (1, 1, 2, 4 threads per row), windows 8 (shifted, padded), 3 x 4, 12 (2 blocks per
window), 16 (N = 256), fp64 and fp32 (relative error < 1e-9 / 1e-4 per output and gradient), fp16 and bf16 (< 5e-2
against the unrounded inputs' reference), 1 and 3 windows per dk / dv group. Exits 1 on a mismatch.
"""
import ctypes
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
EMU = os.path.join(HERE, "emulate")
if not os.path.isdir(EMU):
    print(f"emulate_window_attention_v2: no CUDA emulation headers in {EMU} (the CUDA developer's emulate/): skipped")
    sys.exit(0)
OUT = tempfile.mkdtemp(prefix="vk_emu_v2_")
os.makedirs(os.path.join(OUT, "src"))
sys.path.insert(0, WT)
import vitkernels
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;(){}]*?>)?)<<<(.*?)>>>\(", re.S)
for name in sorted(n for n in os.listdir(os.path.join(WT, "csrc", "cuda")) if n.endswith(".cuh")):
    with open(os.path.join(WT, "csrc", "cuda", name)) as f:
        text = LAUNCH.sub(lambda m: f"::vk_emu::launch({m.group(2).strip()}, {m.group(1)}, ", f.read())
    with open(os.path.join(OUT, "src", name), "w") as f:
        f.write(text)
lib_path = os.path.join(OUT, "libvk2.so")
cmd = ["g++", "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-Wno-unused-function", "-I", os.path.join(OUT, "src"),
       "-I", EMU, "-I", os.path.join(WT, "csrc/include"), os.path.join(HERE, "emulate_window_attention_v2.cpp"), "-o", lib_path]
r = subprocess.run(cmd, capture_output=True, text=True)
if r.returncode: print(r.stderr[-4000:]); sys.exit(1)
lib = ctypes.CDLL(lib_path)
i64 = ctypes.c_int64; P = ctypes.c_void_p
lib.vk2_chunks.restype = i64; lib.vk2_pad_partials.restype = i64; lib.vk2_pad_partials.argtypes = [P, i64]
lib.vk2_fwd.argtypes = [ctypes.c_int] + [P] * 7
lib.vk2_bwd.argtypes = [ctypes.c_int] + [P] * 13 + [i64]
lib.vk2_bias_grad.argtypes = [P, P, i64, i64, i64]
CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ptr = lambda t: ctypes.c_void_p(t.data_ptr())
sys.path.insert(0, WT + "/tests")
from test_window_attention_v2 import make_inputs

def run(case, dtype, per_group):
    B, H, W, nH, hd, win, sh = case
    qkv, table, scale, bias = make_inputs(case)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = qkv.to(dtype).contiguous(); pad = bias.to(dtype).contiguous()
    tab = table.to(acc).contiguous(); tau = scale.to(acc).contiguous()
    dims = (ctypes.c_int64 * 9)(B, H, W, win[0], win[1], sh[0], sh[1], nH, hd)
    windows = B * math.ceil(H / win[0]) * math.ceil(W / win[1]); N = win[0] * win[1]; C = nH * hd
    out = torch.full((B, H, W, C), float("nan"), dtype=dtype); lse = torch.full((windows, nH, N), float("nan"), dtype=acc)
    assert lib.vk2_fwd(CODE[dtype], ptr(q), ptr(pad), ptr(tab), ptr(tau), ptr(out), ptr(lse), dims) == 0
    g = torch.randn(B, H, W, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    go = g.to(dtype).contiguous()
    chunks = lib.vk2_chunks(dims); groups = math.ceil(windows / per_group)
    delta = torch.full((windows, nH, N), float("nan"), dtype=acc); dqkv = torch.full(q.shape, float("nan"), dtype=dtype)
    d_scale = torch.full((windows, nH, chunks), float("nan"), dtype=acc); d_bias = torch.zeros((groups, nH, N, N), dtype=acc)
    d_pad = torch.full((lib.vk2_pad_partials(dims, per_group), nH, 2, hd), float("nan"), dtype=acc)
    assert lib.vk2_bwd(CODE[dtype], ptr(go), ptr(q), ptr(pad), ptr(tab), ptr(tau), ptr(out), ptr(lse), ptr(delta), ptr(dqkv),
                       ptr(d_scale), ptr(d_bias), ptr(d_pad), dims, per_group) == 0
    d_bias_sum = d_bias.double().sum(0).contiguous(); gt = torch.zeros(table.shape, dtype=torch.float64)
    assert lib.vk2_bias_grad(ptr(d_bias_sum), ptr(gt), win[0], win[1], nH) == 0
    gs = d_scale.double().sum((0, 2)); dp = d_pad.double().sum(0)
    gb = torch.cat([torch.zeros(C, dtype=torch.float64), dp[:, 0].reshape(-1), dp[:, 1].reshape(-1)])
    ins = [t.clone().requires_grad_() for t in (qkv, table, scale, bias)]
    ref = vitkernels.window_attention_v2(*ins[:3], win, sh, nH, ins[3], backend="reference")
    rg = [x if x is not None else torch.zeros_like(t) for x, t in zip(torch.autograd.grad(ref, ins, g, allow_unused=True), ins)]
    errs = [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.abs().max() > 0 else (a.double()-b).abs().max().item() for a, b in
            zip([out, dqkv, gt, gs, gb], [ref.detach()] + list(rg))]
    print(case, str(dtype)[6:], per_group, " ".join("%.1e" % e for e in errs), flush=True)
    return errs

bad = 0
for case in [(1, 9, 10, 2, 32, (8, 8), (4, 4)), (2, 5, 11, 2, 20, (3, 4), (1, 2)), (1, 13, 12, 1, 48, (12, 12), (6, 6)),
             (1, 16, 16, 1, 96, (16, 16), (8, 8))]:
    for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 1e-4)]:
        for per_group in (1, 3):
            bad += max(run(case, dtype, per_group)) > tol
for dtype in (torch.float16, torch.bfloat16):
    bad += max(run((1, 9, 10, 2, 32, (8, 8), (4, 4)), dtype, 1)[:4]) > 5e-2
print("FAILED" if bad else "all ok")
sys.exit(1 if bad else 0)
