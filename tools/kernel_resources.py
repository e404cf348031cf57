"""Ahead-of-time compile of one recorded Triton launch for a GPU architecture, without a GPU, and its resources.

``compile_launch(launch, arch)`` turns a :class:`vitkernels.triton._launch.Launch` (kernel, arguments, constexprs,
warps, stages: what the host launcher would have launched) into ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 80 | 90, 32))`` and reads back from the cubin (``cuobjdump`` of Triton's own CUDA
toolchain): registers per thread, spill stores (local memory), stack frame, shared memory, whether tensor-core
instructions (``mma`` / ``wgmma``) are present, and SASS instruction counts (whole kernel, and the body of the
outermost loop, which for the window-attention kernels is the per-window work of one warp).

The row format (shared with ``tools/compile_gate_cuda.py``)::

    {"backend", "kernel", "config", "arch", "registers", "spill_bytes", "stack_bytes", "shared_bytes",
     "tensor_core", "headline", "status", "problem"}

plus Triton-only extras under ``"extra"`` (SASS counts, the signature).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Optional

os.environ.pop("TRITON_INTERPRET", None)  # compile for real GPUs, whatever the caller's environment says

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vitkernels.triton._launch import LAUNCH_OPTIONS  # noqa: E402  (the launcher's list: one for both)

try:  # triton >= 3.3
    from triton._C.libtriton import native_specialize_impl  # noqa: E402
except ImportError:  # pragma: no cover - older triton
    native_specialize_impl = None

ARCH_CAPABILITY = {"sm_80": 80, "sm_90": 90}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def cuobjdump() -> str:
    """Path of the cuobjdump that ships with Triton (the CUDA toolkit's when Triton's is absent)."""
    path = os.path.join(_BIN, "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _signature(kernel, bound: Dict[str, Any]):
    """Triton's (signature, constexprs, attributes) for the bound arguments, as its JIT launcher specialises them."""
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = bound[name]
        if param.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, bool(getattr(param, "is_const", False)),
                                         not param.do_not_specialize, not param.do_not_specialize_on_alignment)
        if ty == "constexpr":  # e.g. an int equal to 1, or None
            sig[name] = "constexpr"
            consts[name] = key
            continue
        if isinstance(value, float):
            # torch.compile's inductor types a Python float argument of a user kernel fp64 (eager launches: fp32):
            # the stricter of the two is compiled, so a kernel that lets fp64 into its math fails here, not on a GPU
            ty = "fp64"
        sig[name] = ty
        if key == "D":  # 16-byte aligned pointer / integer divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _sass_counts(sass: str) -> Dict[str, int]:
    """Static SASS instructions (NOPs excluded) of the kernel and of its outermost loop's body."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    code = [(int(addr, 16), text.strip()) for addr, text in lines]
    total = sum(1 for _, text in code if not re.search(r"\bNOP\b", text))
    loop = 0
    for addr, text in code:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|)?\s*(0x[0-9a-f]+)", text)
        if m:
            target = int(m.group(1), 16)
            if target < addr:  # a backward branch: a loop from target to here
                body = sum(1 for a, t in code if target <= a <= addr and not re.search(r"\bNOP\b", t))
                loop = max(loop, body)
    return {"sass_instructions": total, "sass_loop_body": loop}


def config_label(launch) -> str:
    """The launch configuration, prefixed with the input element type (the first bf16 / fp16 tensor argument's,
    else the first floating-point one's: a bf16 and an fp32 compile of the same tiles are different rows)."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    dtypes = [v.dtype for v in launch.args if isinstance(v, torch.Tensor) and v.is_floating_point()]
    half = [d for d in dtypes if d in (torch.float16, torch.bfloat16)]
    dtype = names.get((half or dtypes or [None])[0], "")
    return f"{dtype} {launch.config().label}".strip()


TENSOR_CORE_PTX = re.compile(r"\b(wgmma\.mma_async|mma\.sync)")  # Hopper / Ampere matrix instructions


@contextlib.contextmanager
def _llvm_optimization_skipped():
    """Within it, Triton's call of LLVM's O3 pipeline (``llvm.optimize_module`` in the backend's "llir" stage) does
    nothing; where this Triton has no such function, nothing changes."""
    from triton._C.libtriton import llvm

    optimize = getattr(llvm, "optimize_module", None)
    if optimize is None:
        yield
        return
    llvm.optimize_module = lambda *args, **kwargs: None
    try:
        yield
    finally:
        llvm.optimize_module = optimize


def _llir_only_stages(*args):
    """Triton's pipeline-stages hook (``knobs.runtime.add_stages_inspection_hook``) that ends a compile at LLVM IR, and
    skips LLVM's optimisation on the way: the "llir" stage still runs Triton's whole MLIR pipeline (layouts, the
    shared-memory allocation, the lowering to LLVM IR) but not LLVM's O3 pipeline over the result (about a quarter of
    a compile's CPU time; it changes the code ptxas would get, not the shared memory Triton allocated or its
    tensor-core instructions, inline PTX in the IR); the "ptx" stage (LLVM's NVPTX backend over IR that real compiles
    never give it unoptimised: 16% of what is left, measured over 40 table examples) only names the kernel, and the
    "cubin" stage (ptxas) returns no binary. Called without arguments, it returns its part of the cache key, so such
    a compile never stands in for a full one."""
    if not args:
        return "vitkernels-llir-unoptimized", "vitkernels-llir-unoptimized"
    stages = args[1]
    make_llir = stages["llir"]

    def llir_without_llvm_optimization(src, metadata):
        with _llvm_optimization_skipped():
            return make_llir(src, metadata)

    def kernel_name_only(src, metadata):
        # what the ptx stage would also set: the entry's name (the launcher looks the kernel up by it)
        metadata["name"] = re.search(r"^define\b[^@\n]*@([\w.$]+)\(", src, re.M).group(1)
        return ""

    stages["llir"] = llir_without_llvm_optimization
    stages["ptx"] = kernel_name_only
    stages["cubin"] = lambda src, metadata: b""


def compile_launch(launch, arch: str, keep_dir: Optional[str] = None, sass: bool = True,
                   assemble: bool = True) -> Dict[str, Any]:
    """Compile ``launch`` for ``arch`` ("sm_80" / "sm_90"); a row with the resources, or status "fail". ``sass``:
    also disassemble the cubin for the SASS instruction counts (not needed to gate resources; kept with ``keep_dir``).
    ``assemble=False``: stop at LLVM IR that LLVM did not optimise (no O3, no PTX, no ptxas: over half of a
    compile's time, ``_llir_only_stages``): the row has the shared memory (Triton's allocation, known after the LLVM
    IR stage) and the tensor-core use (the IR's inline PTX), not registers / spills / stack."""
    kernel = launch.kernel
    bound = dict(zip(kernel.arg_names, launch.args))
    options = {}
    for key, value in launch.kwargs.items():
        if key in LAUNCH_OPTIONS:
            options[key] = value
        else:
            bound[key] = value
    row: Dict[str, Any] = dict(backend="triton", kernel=launch.name, config=config_label(launch), arch=arch,
                               registers=None, spill_bytes=None, stack_bytes=None, shared_bytes=None,
                               tensor_core=None, headline=False, status="fail", problem=None, extra={})
    log = io.StringIO()
    try:
        sig, consts, attrs = _signature(kernel, bound)
        # Triton runs ptxas -v itself; with dump_ptxas_log it prints the log (registers, spills, stack) here
        with triton.knobs.nvidia.scope(), triton.knobs.runtime.scope(), contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True
            if not assemble:
                triton.knobs.runtime.add_stages_inspection_hook = _llir_only_stages
            compiled = triton.compile(ASTSource(kernel, sig, consts, attrs),
                                      target=GPUTarget("cuda", ARCH_CAPABILITY[arch], 32), options=options)
    except Exception as exc:  # the gate reports it as a failure
        last = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
        row["problem"] = f"compile: {type(exc).__name__}: {last}"
        return row
    ptx = compiled.asm["ptx"]
    # the tensor-core instructions, in the PTX or, for a compile that stopped at LLVM IR, its inline PTX
    tensor_core = bool(TENSOR_CORE_PTX.search(ptx if assemble else compiled.asm["llir"]))
    launch_options = dict(num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3))
    if not assemble:
        if not compiled.asm["llir"].strip() or compiled.metadata.shared is None:
            row["problem"] = "no LLVM IR / shared memory size from the compile"
            return row
        row.update(shared_bytes=int(compiled.metadata.shared), tensor_core=tensor_core, status="ok")
        row["extra"] = dict(**launch_options, assembled=False)
        return row
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True).stdout \
            if sass or keep_dir else ""
    if keep_dir:
        os.makedirs(keep_dir, exist_ok=True)
        base = os.path.join(keep_dir, re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{arch}_{launch.name}_{row['config']}"))
        with open(base + ".ptx", "w") as f:
            f.write(ptx)
        with open(base + ".sass", "w") as f:
            f.write(sass)
        with open(base + ".ttgir", "w") as f:
            f.write(compiled.asm.get("ttgir", ""))
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", usage)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if not m or not spills:
        row["problem"] = "no resource usage in cuobjdump -res-usage / the ptxas log"
        return row
    regs, stack, static_smem = (int(x) for x in m.groups())
    row.update(
        registers=regs,
        spill_bytes=int(spills.group(1)),  # bytes of spill stores (ptxas -v)
        stack_bytes=stack,
        shared_bytes=max(int(compiled.metadata.shared), static_smem),
        tensor_core=tensor_core,
        status="ok",
    )
    row["extra"] = dict(**launch_options, **(_sass_counts(sass) if sass else {}))
    return row
