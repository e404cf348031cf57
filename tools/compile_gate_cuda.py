"""CUDA compile gate: compile every CUDA source of vitkernels._C for real GPUs, without a GPU, and gate its resources.

    python tools/compile_gate_cuda.py [--arch sm_80,sm_90] [--jobs N] [--log build.log] > rows.json

Compiles each ``cuda:`` source of ``csrc/SOURCES`` as ``setup.py``'s CUDA build does: the kernels (``*.cu``, no torch
headers) once with nvcc, ``-gencode`` for every arch and ``-Xptxas -v``; the torch bindings (``*.cpp``, host code
calling the kernels' launchers) with the host compiler, torch's headers and CUDA's include directory. Where the CPU
wheel of torch or this CUDA toolkit lacks a header that torch's CUDA headers include
(``c10/cuda/impl/cuda_cmake_macros.h``; cuBLAS / cuSPARSE / cuSOLVER headers), a compile-only stand-in from
``csrc/cuda/check/stub_include`` is put on the include path; nothing is linked or run. Then reads, per kernel
instantiation and arch, ptxas's registers, stack frame, spill stores + loads and static shared memory, and whether
its SASS has tensor-core instructions (``cuobjdump -sass``, the one Triton ships when the toolkit has none).

Prints a JSON list of rows on stdout (the format the resource table ``benchmarks/results/kernel-resources.md``
merges with the Triton gate's rows)::

    {"backend": "cuda", "kernel": str, "config": str, "arch": "sm_80" | "sm_90", "registers": int,
     "spill_bytes": int, "stack_bytes": int, "shared_bytes": int, "tensor_core": bool | null, "headline": bool,
     "status": "ok" | "fail", "problem": str | null}

and a readable table on stderr. Exits 1 when a row fails:
  * a source does not compile (a row per source and arch, kernel = the source; arch "host" for a binding);
  * a headline configuration spills (window attention forward / backward, Swin V1 and V2, fp16 / bf16, head_dim <=
    32 or <= 64; 3D window attention forward / backward, fp32 / fp16 / bf16, head_dim <= 32: the instantiation that
    runs MONAI's 7x7x7 windows at head_dim 16 and 32 and Video Swin's 8x7x7 at head_dim 32, window sizes being a
    runtime argument);
  * static shared memory over 48 KiB, or static + dynamic over the arch's per-block limit (every launcher here
    passes 0 bytes of dynamic shared memory: checked at the launch sites, a launch with dynamic memory fails the
    gate until this script accounts for it);
  * registers x 256 threads (the largest block any launcher uses) over the 64 K register file;
  * a symbol of vitkernels that one object needs and no object defines (a missing explicit instantiation).
Without nvcc it prints ``[]``, says so on stderr and exits 0 (CI has nvcc; a machine without one cannot check).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB_INCLUDE = os.path.join(ROOT, "csrc", "cuda", "check", "stub_include")

# The nvcc flags of setup.py's CUDA build (release: -O3), then torch's own (COMMON_NVCC_FLAGS); and its host
# compiler's flags for the bindings.
SETUP_NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-DVITKERNELS_WITH_CUDA"]
SETUP_CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function", "-DVITKERNELS_WITH_CUDA"]

ARCH_SHARED_LIMIT = {  # bytes of shared memory one block may use (static + dynamic, opt-in)
    "sm_80": 163 * 1024,
    "sm_86": 99 * 1024,
    "sm_89": 99 * 1024,
    "sm_90": 227 * 1024,
}
STATIC_SHARED_LIMIT = 48 * 1024  # __shared__ arrays, any arch
REGISTER_FILE = 64 * 1024  # 32-bit registers per multiprocessor (and per block)
MAX_BLOCK_THREADS = 256  # kWindowAttentionMaxThreads, kMaskingThreads and the other launchers' kThreads

DTYPES = {"float": "fp32", "double": "fp64", "__half": "fp16", "__nv_bfloat16": "bf16"}
COPY_UNITS = {"unsigned char": 1, "unsigned short": 2, "unsigned int": 4, "uint2": 8, "uint4": 16}
# Window attention kernels, Swin V1, V2 and 3D: template <typename T, int G>, G threads per token row of head_dim <=
# 32 G. (One instantiation serves every window size: N is a runtime argument.)
WINDOW_ATTENTION = tuple(f"window_attention{v}_{k}" for v in ("", "_v2", "_3d") for k in ("fwd", "bwd_dq", "bwd_dkdv"))
HEADLINE_DTYPES = ("fp16", "bf16")
HEADLINE_SLICES = (1, 2)  # head_dim 32 and 64
# 3D: 7x7x7 head_dim 16 / 32 and 8x7x7 head_dim 32 (G = 1), in every dtype but fp64
HEADLINE_3D_DTYPES = ("fp32", "fp16", "bf16")
HEADLINE_3D_SLICES = (1,)
TENSOR_CORE_OPS = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA|QGMMA|BMMA|DMMA|OMMA)\b")


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def cuda_sources():
    """The ``cuda:`` sources of csrc/SOURCES (the list setup.py and CMakeLists.txt build), repository-relative."""
    out = []
    with open(os.path.join(ROOT, "csrc", "SOURCES")) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if line:
                kind, path = (part.strip() for part in line.split(":", 1))
                if kind == "cuda":
                    out.append(os.path.join("csrc", path))
    return out


def nvcc_include_dirs(nvcc):
    """The include directories nvcc itself passes (from its --dryrun INCLUDES / SYSTEM_INCLUDES lines)."""
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    dirs = []
    for line in (dry.stdout + dry.stderr).splitlines():
        if "INCLUDES=" in line:
            dirs += re.findall(r'(?:-I|"-isystem" )"?([^"\s]+)"?', line)
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def stub_dir(search_dirs, workdir):
    """A directory holding the stand-ins of csrc/cuda/check/stub_include whose real header none of search_dirs has."""
    out = os.path.join(workdir, "stubs")
    used = []
    for base, _, files in os.walk(STUB_INCLUDE):
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), STUB_INCLUDE)
            if any(os.path.exists(os.path.join(d, rel)) for d in search_dirs):
                continue
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            shutil.copy(os.path.join(STUB_INCLUDE, rel), os.path.join(out, rel))
            used.append(rel)
    return out, sorted(used)


def find_tool(name):
    path = shutil.which(name)
    if path:
        return path
    try:  # Triton's NVIDIA backend ships cuobjdump / nvdisasm
        import triton

        candidate = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(candidate, os.X_OK):
            return candidate
    except Exception:
        pass
    return None


def dynamic_shared_memory_launches():
    """Launch sites in csrc/cuda whose third <<<...>>> argument (dynamic shared memory) is not a literal 0."""
    bad = []
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    for name in sorted(os.listdir(cuda_dir)):
        if not name.endswith((".cu", ".cuh")):
            continue
        text = open(os.path.join(cuda_dir, name)).read()
        for m in re.finditer(r"<<<(.*?)>>>", text, re.S):
            args = [a.strip() for a in split_top_level(m.group(1))]
            if len(args) >= 3 and args[2] != "0":
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"csrc/cuda/{name}:{line}: <<<{m.group(1).strip()}>>>")
    return bad


def split_top_level(text, sep=","):
    """Split on `sep` outside <>, (), [] (template arguments, calls)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def compile_source(nvcc, cxx, source, flags, host_flags, archs, workdir):
    """A kernel source (.cu) through nvcc for every arch, a binding (.cpp) through the host compiler."""
    obj = os.path.join(workdir, os.path.splitext(os.path.basename(source))[0] + ".o")
    if source.endswith(".cpp"):
        cmd = [cxx, "-c", source, "-o", obj] + host_flags
    else:
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
        cmd = [nvcc, "-c", source, "-o", obj, "-Xptxas", "-v"] + gencode + flags
    t0 = time.time()
    with tempfile.TemporaryFile(mode="w+") as output:
        # wait4: the CPU time of nvcc and every tool it ran (cicc, ptxas, the host compiler), for the CI budget
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    return {"source": source, "object": obj, "rc": proc.returncode, "output": text, "seconds": time.time() - t0,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "cmd": cmd}


def parse_ptxas(output):
    """{(mangled, arch): {registers, stack_bytes, spill_bytes, shared_bytes}} from ptxas -v output."""
    rows, cur = {}, None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = (m.group(1), m.group(2))
            rows[cur] = {"registers": 0, "stack_bytes": 0, "spill_bytes": 0, "shared_bytes": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            rows[cur]["stack_bytes"] = int(m.group(1))
            rows[cur]["spill_bytes"] = int(m.group(2)) + int(m.group(3))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[cur]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            rows[cur]["shared_bytes"] = int(s.group(1)) if s else 0
    return rows


def demangle(names):
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return dict(zip(names, out)) if proc.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def tensor_core_use(cuobjdump, objects, jobs):
    """{(mangled, arch): bool} from the SASS of the objects; {} when cuobjdump is missing or fails."""
    found = {}
    if cuobjdump is None:
        return found

    def sass(obj):
        return subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True)

    # the objects' disassemblies side by side (one after the other they kept one core of two idle)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        procs = list(pool.map(sass, objects))
    for proc in procs:
        if proc.returncode != 0:
            continue
        arch, func = None, None
        for line in proc.stdout.splitlines():
            m = re.match(r"\s*arch = (sm_\w+)", line)
            if m:
                arch = m.group(1)
                continue
            m = re.match(r"\s*Function : (\S+)", line)
            if m:
                func = (m.group(1), arch)
                found.setdefault(func, False)
                continue
            if func is not None and TENSOR_CORE_OPS.search(line):
                found[func] = True
    return found


def describe(demangled):
    """(kernel, config, headline) of a demangled kernel instantiation, e.g.
    'void vitkernels::cuda::wa_detail::window_attention_fwd_kernel<__half, 2>(...)' ->
    ('window_attention_fwd', 'fp16 head_dim<=64 (2 threads/row)', True)."""
    head = demangled[5:] if demangled.startswith("void ") else demangled
    depth, cut = 0, len(head)
    for i, ch in enumerate(head):  # the name ends at the first top-level '(' (arguments)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = head[:cut]
    args = []
    if name.endswith(">") and "<" in name:
        lt = name.index("<")
        args = [a.strip() for a in split_top_level(name[lt + 1:-1])]
        name = name[:lt]
    kernel = name.split("::")[-1]
    kernel = kernel[: -len("_kernel")] if kernel.endswith("_kernel") else kernel
    config, dtype, slices = [], None, None
    for a in args:
        if a in DTYPES:
            dtype = DTYPES[a]
            config.append(dtype)
        elif a in COPY_UNITS:
            config.append(f"{COPY_UNITS[a]}-byte copy units")
        elif re.fullmatch(r"\d+", a) and kernel in WINDOW_ATTENTION:
            slices = int(a)
            config.append(f"head_dim<={32 * slices} ({slices} thread{'s' if slices > 1 else ''}/row)")
        else:
            config.append(a)
    if kernel.startswith("window_attention_3d_"):
        headline = kernel in WINDOW_ATTENTION and dtype in HEADLINE_3D_DTYPES and slices in HEADLINE_3D_SLICES
    else:
        headline = kernel in WINDOW_ATTENTION and dtype in HEADLINE_DTYPES and slices in HEADLINE_SLICES
    return kernel, " ".join(config) or "-", headline


def gate(row):
    problems = []
    if row["headline"] and row["spill_bytes"] > 0:
        problems.append(f"spills {row['spill_bytes']} bytes in a headline configuration")
    if row["shared_bytes"] > STATIC_SHARED_LIMIT:
        problems.append(f"static shared memory {row['shared_bytes']} B > {STATIC_SHARED_LIMIT} B")
    limit = ARCH_SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared_bytes"] > limit:
        problems.append(f"shared memory {row['shared_bytes']} B > {row['arch']}'s {limit} B per block")
    if row["registers"] * MAX_BLOCK_THREADS > REGISTER_FILE:
        problems.append(f"{row['registers']} registers x {MAX_BLOCK_THREADS} threads > {REGISTER_FILE}")
    row["status"] = "fail" if problems else "ok"
    row["problem"] = "; ".join(problems) or None
    return row


def fail_row(kernel, config, arch, problem):
    return {"backend": "cuda", "kernel": kernel, "config": config, "arch": arch, "registers": 0, "spill_bytes": 0,
            "stack_bytes": 0, "shared_bytes": 0, "tensor_core": None, "headline": False, "status": "fail",
            "problem": problem}


def undefined_symbols(objects):
    """vitkernels symbols some object needs and none defines (e.g. a launcher without its explicit instantiation)."""
    nm = shutil.which("nm")
    if nm is None:
        return []
    defined, needed = set(), set()
    for obj in objects:
        proc = subprocess.run([nm, obj], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "U":
                needed.add(parts[1])
            elif len(parts) == 3 and parts[1] not in ("U", "w", "v"):
                defined.add(parts[2])
    missing = sorted(s for s in needed - defined if "10vitkernels" in s)
    return list(demangle(missing).values())


def print_table(rows):
    cols = ["kernel", "config", "arch", "registers", "spill_bytes", "stack_bytes", "shared_bytes", "tensor_core",
            "headline", "status"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    log("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        log("  ".join(str(r[c]).ljust(width[c]) for c in cols) + (f"  {r['problem']}" if r["problem"] else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc runs")
    parser.add_argument("--log", help="write every nvcc command and its whole output here")
    parser.add_argument("--keep", help="keep the objects in this directory (default: a temporary one)")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        log("compile_gate_cuda: nvcc not found: the CUDA sources cannot be compiled here (no rows)")
        print("[]")
        return 0
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    torch_includes = include_paths()
    nvcc_includes = nvcc_include_dirs(nvcc)
    workdir = args.keep or tempfile.mkdtemp(prefix="vitkernels_cuda_gate_")
    os.makedirs(workdir, exist_ok=True)
    stubs, stubbed = stub_dir(torch_includes + nvcc_includes, workdir)
    common = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_API_INCLUDE_EXTENSION_H",
              "-DTORCH_EXTENSION_NAME=_C", "-I" + os.path.join(ROOT, "csrc", "include")]
    includes = ["-I" + d for d in torch_includes] + ["-I" + stubs]
    flags = SETUP_NVCC_FLAGS + list(COMMON_NVCC_FLAGS) + ["-Xcompiler", "-fPIC"] + common + includes
    # the bindings: torch's headers, then CUDA's (nvcc adds those itself), the stand-ins last
    host_flags = SETUP_CXX_FLAGS + ["-fPIC"] + common + includes[:-1] + ["-I" + d for d in nvcc_includes] + \
        includes[-1:]
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    sources = cuda_sources()
    log(f"compile_gate_cuda: {len(sources)} sources ({','.join(archs)} with {nvcc}, bindings with {cxx}; {args.jobs} "
        f"jobs); torch "
        f"{torch.__version__}; stand-ins for missing headers: {', '.join(stubbed) or 'none'}")

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # the longest compiles first, so that neither job is left alone at the end: the backward kernel
        # instantiations (30-41 CPU-s each), the forward ones (20-23), then the bindings (~11 each with the host
        # compiler; through nvcc's front ends, once per arch and once for the host, they took 45-57)
        order = sorted(sources, key=lambda s: (not s.endswith("_bwd_kernels.cu"), not s.endswith("_fwd_kernels.cu"),
                                               s.endswith(".cpp"), s))
        results = list(pool.map(lambda s: compile_source(nvcc, cxx, s, flags, host_flags, archs, workdir), order))
    for res in results:
        log(f"  {res['source']}: {'ok' if res['rc'] == 0 else 'FAILED'} in {res['seconds']:.0f} s "
            f"({res['cpu_seconds']:.0f} CPU s)")
    log(f"compile_gate_cuda: compiled in {time.time() - t0:.0f} s ({sum(r['cpu_seconds'] for r in results):.0f} CPU s)")
    if args.log:
        with open(args.log, "w") as f:
            for res in results:
                f.write("$ " + " ".join(res["cmd"]) + f"\n(rc {res['rc']}, {res['seconds']:.1f} s, "
                        f"{res['cpu_seconds']:.1f} CPU s)\n{res['output']}\n")

    rows, resources = [], {}
    for res in results:
        if res["rc"] != 0:
            errors = [ln for ln in res["output"].splitlines() if "error" in ln.lower()]
            problem = (errors[0] if errors else res["output"].strip().splitlines()[-1:] or ["nvcc failed"])[0]
            log(f"--- {res['source']} failed:\n" + "\n".join(errors[:20] or res["output"].splitlines()[-20:]))
            arches = ["host"] if res["source"].endswith(".cpp") else archs
            rows += [fail_row(res["source"], "compile", a, problem.strip()[:300]) for a in arches]
        else:
            for key, value in parse_ptxas(res["output"]).items():
                resources.setdefault(key, value)  # a kernel compiled into two objects: the same code
    objects = [res["object"] for res in results if res["rc"] == 0]
    tensor_core = tensor_core_use(find_tool("cuobjdump"), objects, args.jobs)
    names = demangle(sorted({mangled for mangled, _ in resources}))
    for (mangled, arch), res in resources.items():
        kernel, config, headline = describe(names[mangled])
        row = {"backend": "cuda", "kernel": kernel, "config": config, "arch": arch, **res,
               "tensor_core": tensor_core.get((mangled, arch)), "headline": headline}
        rows.append(gate(row))
    for site in dynamic_shared_memory_launches():
        rows += [fail_row("launch", "dynamic shared memory", a,
                          f"{site}: dynamic shared memory is not accounted by the gate") for a in archs]
    if all(res["rc"] == 0 for res in results):
        for symbol in undefined_symbols(objects):
            rows += [fail_row(symbol, "link", a, "needed by an object, defined by none") for a in archs]

    keys = ["backend", "kernel", "config", "arch", "registers", "spill_bytes", "stack_bytes", "shared_bytes",
            "tensor_core", "headline", "status", "problem"]
    rows = [{k: r[k] for k in keys} for r in sorted(rows, key=lambda r: (r["kernel"], r["config"], r["arch"]))]
    if rows:
        print_table(rows)
    failed = [r for r in rows if r["status"] == "fail"]
    log(f"compile_gate_cuda: {len(rows)} rows, {len(failed)} failed, {time.time() - t0:.0f} s")
    print(json.dumps(rows, indent=1))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
