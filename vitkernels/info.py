"""``python -m vitkernels.info``: versions, what the extension was built with, and which backend serves each op.

For every registered op and every device type present (CPU always, CUDA when available) it prints the backend
``auto`` picks for a float32 and a bfloat16 call, and for each backend that cannot serve such a call, why not.
"""
from __future__ import annotations

import platform
import sys
from typing import Dict, List

import torch

import vitkernels
from vitkernels import _native, dispatch
from vitkernels import triton as vk_triton
from vitkernels.ops import gelu_mlp as gelu_mlp_op
from vitkernels.ops import linear as linear_op

DTYPES = (torch.float32, torch.bfloat16)


def versions() -> Dict[str, str]:
    """Python / torch / CUDA / triton versions and devices, queried now (never at import)."""
    cuda_available = torch.cuda.is_available()
    info = {
        "vitkernels": vitkernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA build": str(torch.version.cuda),
        "CUDA available": str(cuda_available),
        "triton": vk_triton.TRITON_VERSION or "not importable",
        "triton interpreter": "on (TRITON_INTERPRET=1)" if vk_triton.interpreter_active() else "off",
        "CPU threads": str(torch.get_num_threads()),
        "CPU float32 GEMM": f"{linear_op.CPU_GEMM} ({linear_op.CPU_GEMM_REASON})",
    }
    if linear_op.CPU_GEMM == "onednn" and linear_op.grad_x_through_mm(linear_op.GRAD_X_MM_MIN_IN_FEATURES):
        info["CPU float32 GEMM"] += (f"; input gradients of Linears with >= {linear_op.GRAD_X_MM_MIN_IN_FEATURES} "
                                     "input features: ATen's mm (an AVX2 CPU)")
    forward_mm = linear_op.forward_through_mm(linear_op.FORWARD_MM_MIN_ROWS, linear_op.FORWARD_MM_MIN_IN_FEATURES, 1)
    if linear_op.CPU_GEMM == "onednn" and not linear_op.OWN_GEMM and forward_mm:
        info["CPU float32 GEMM"] += (f"; layers' forward products with >= {linear_op.FORWARD_MM_MIN_ROWS} rows, "
                                     f">= {linear_op.FORWARD_MM_MIN_IN_FEATURES} input features and weights of <= "
                                     f"{linear_op.FORWARD_MM_MAX_WEIGHT} elements: ATen's GEMM (an AVX2 CPU)")
    info["CPU own GEMM (layers' Linears)"] = (f"{'on' if linear_op.OWN_GEMM else 'off'} "
                                              f"({linear_op.OWN_GEMM_REASON})")
    if linear_op.CPU_GEMM == "onednn" and gelu_mlp_op.layers_take_it():
        mlp_gemm = "vitkernels' own GEMM" if linear_op.OWN_GEMM else "ATen's mm"
        info["CPU float32 GEMM"] += ("; MLPs with a large hidden activation (Swin-T stage 1) by blocks of rows "
                                     f"through {mlp_gemm} (an AVX2 CPU)")
    if linear_op.OWN_GEMM and gelu_mlp_op.eager_op_built():
        info["CPU float32 GEMM"] += ("; the Swin blocks' other MLPs unblocked, bias + GELU and its derivative in the "
                                     "own GEMM's epilogues (gelu_mlp_eager; gelu_mlp_own under torch.compile)")
    if cuda_available:
        info["CUDA device"] = torch.cuda.get_device_name()
        info["CUDA capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    if _native.is_loaded():
        build = _native.build_info()
        info["vitkernels._C"] = ", ".join(f"{k}={v}" for k, v in build.items())
        native_ops = sorted(op for op, keys in _native.KERNELS.items() if keys)
        info["vitkernels._C kernels"] = ", ".join(
            f"{op}[{'+'.join(sorted(_native.KERNELS[op]))}]" for op in native_ops
        )
    else:
        info["vitkernels._C"] = f"not loaded: {_native.IMPORT_ERROR}"
    return info


def backend_table(device_types: List[str]) -> List[str]:
    """One block per op: the auto choice per (device, dtype) and every unavailable backend's reason."""
    lines: List[str] = []
    for name in sorted(dispatch.REGISTRY):
        op = dispatch.REGISTRY[name]
        lines.append(f"{name}: {op.doc}" if op.doc else name)
        for device_type in device_types:
            for dtype in DTYPES:
                call = dispatch.Call(torch.device(device_type), dtype)
                choice, reasons = op.auto_choice(call)
                label = f"{device_type}/{str(dtype).replace('torch.', '')}"
                lines.append(f"  {label:<15} auto -> {choice or 'NONE'}")
                for backend in dispatch.BACKENDS:
                    if reasons[backend] is not None:
                        lines.append(f"  {'':<15}   {backend}: {reasons[backend]}")
    return lines


def report() -> str:
    vers = versions()
    width = max(len(k) for k in vers)
    lines = ["vitkernels environment", "======================"]
    lines += [f"{k:<{width}} : {v}" for k, v in vers.items()]
    lines += ["", "Backends per op (auto order: CUDA triton > native > reference; CPU native > reference)",
              "=" * 84]
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines += backend_table(device_types)
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
