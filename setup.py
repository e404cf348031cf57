"""Build and install vitkernels, with the C++/CUDA extension ``vitkernels._C``.

Install torch first, then build without build isolation (an isolated build would download its own torch)::

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

The CPU units' common torch headers (csrc/include/vitkernels/precompiled.h) are precompiled once per build, with
the units' own flags (precompiled_header_build).

Environment switches:
    VITKERNELS_SKIP_EXT=1     build no extension (the reference and Triton backends still work)
    VITKERNELS_CUDA=1 / 0     force / skip the CUDA sources (default: built when torch is a CUDA build and
                              a CUDA toolkit is found)
    VITKERNELS_CUDA_ARCH      CUDA architectures, e.g. "9.0" or "8.0;9.0" (sets TORCH_CUDA_ARCH_LIST)
    MAX_JOBS                  parallel compile jobs (read by torch's ninja build)
    VITKERNELS_DEBUG=1        -O0 -g
    VITKERNELS_SANITIZE=1     AddressSanitizer + UndefinedBehaviorSanitizer build of the CPU sources (-O0 -g1; any
                              UB report aborts; on a CPU without AVX-512, without the AVX-512 kernels, which its
                              tests could not run). Build it outside the source tree so it does not replace the normal
                              in-place build, and preload the runtimes into the (uninstrumented) Python, as
                              .ci/sanitize does:
                                  python setup.py build_ext --build-lib build/sanitize --build-temp build/sanitize-tmp
                                  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
                                  ASAN_OPTIONS=detect_leaks=0 python ...
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_sources():
    """The extension's sources from csrc/SOURCES: (cpu, cuda) lists of paths relative to the repository root."""
    sources = {"cpu": [], "cuda": []}
    with open(os.path.join(ROOT, "csrc", "SOURCES")) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            kind, path = (part.strip() for part in line.split(":", 1))
            if kind not in sources:
                raise ValueError(f"csrc/SOURCES: unknown kind {kind!r} in line {raw!r}")
            sources[kind].append(os.path.join("csrc", path))
    return sources["cpu"], sources["cuda"]


def env_switch(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {value!r}")


def extension_modules():
    if env_switch("VITKERNELS_SKIP_EXT"):
        print("vitkernels: VITKERNELS_SKIP_EXT=1, not building vitkernels._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("vitkernels: torch is not installed in the build environment, not building vitkernels._C "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}

    cpu_sources, cuda_sources = read_sources()
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    want_cuda = env_switch("VITKERNELS_CUDA")
    if want_cuda and not cuda_possible:
        raise RuntimeError(
            "VITKERNELS_CUDA=1 but CUDA sources cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}")
    with_cuda = cuda_possible if want_cuda is None else want_cuda
    arch = os.environ.get("VITKERNELS_CUDA_ARCH")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch

    debug = bool(env_switch("VITKERNELS_DEBUG"))
    sanitize = bool(env_switch("VITKERNELS_SANITIZE"))
    # sanitized: -O0, where ASan sees every access as written (nothing optimised away); it also compiles the
    # template-heavy attention kernels ~3.6x faster than -O1 (window_attention.cpp: 31 s vs 112 s alone; the whole
    # sanitized build 165 CPU-s, was ~600 s in CI), and the sanitized tests ran no slower (154 s on an idle 2-core
    # VM). -g1 (line tables, enough for the reports' file:line stacks) compiles in about half the time of -g.
    opt = ["-O0", "-g"] if debug else ["-O0", "-g1"] if sanitize else ["-O3"]
    # Release C++: -g0 overrides the -g of Python's CFLAGS: no debug info (as in torch's wheels; VITKERNELS_DEBUG=1
    # has it) and a third less compile time (the CPU sources on 2 cores: 333 -> 222 CPU-s, 183 -> 130 s;
    # csrc/cpu/linear.cpp, with torch's autograd headers, 41 -> 19 s)
    release_cxx = [] if debug or sanitize else ["-g0"]
    cxx_flags = opt + release_cxx + ["-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"]
    nvcc_flags = opt + ["-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
    link_flags = ["-fopenmp"]
    if sanitize:
        # CPython leaks by design (run with ASAN_OPTIONS=detect_leaks=0); vptr checks need the RTTI of every torch
        # class the extension touches, which the (uninstrumented) torch libraries do not export: off.
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                      "-fno-omit-frame-pointer"]
        cxx_flags += sanitizers
        # a Python built with -fstack-protector-strong in its CFLAGS (Debian's) passes it on; with ASan's stack
        # layout the canary then left 64-byte aligned locals (the AVX-512 kernels' zmm arrays) at 32 bytes, which
        # UBSan reports as a misaligned load. ASan's redzones guard the stack anyway.
        cxx_flags.append("-fno-stack-protector")
        link_flags += sanitizers
        if with_cuda:
            raise RuntimeError("VITKERNELS_SANITIZE=1 builds the CPU sources only: set VITKERNELS_CUDA=0")
    macros = []
    if sanitize and not cpu_has_avx512():
        # the sanitized build serves this machine's tests, which can run no AVX-512 code here: not compiled (a third
        # of the per-instruction-set kernel code, cpu_isa_each.h), never selected (cpu_isa.h)
        macros.append(("VK_CPU_NO_AVX512", None))
    if with_cuda:
        macros.append(("VITKERNELS_WITH_CUDA", None))
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            macros.append(("VITKERNELS_CUDA_ARCH_LIST", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"'))
    extension = (CUDAExtension if with_cuda else CppExtension)(
        name="vitkernels._C",
        sources=cpu_sources + (cuda_sources if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
    kind = ("CPU + CUDA" if with_cuda else "CPU only") + (", ASan + UBSan" if sanitize else "")
    print(f"vitkernels: building vitkernels._C ({kind})", file=sys.stderr)
    return [extension], {"build_ext": precompiled_header_build(BuildExtension).with_options(use_ninja=True)}


PRECOMPILED_HEADER = os.path.join("vitkernels", "precompiled.h")  # under csrc/include


def precompiled_header_build(build_extension):
    """``build_extension`` (torch's BuildExtension) that first precompiles csrc/include/vitkernels/precompiled.h, the
    torch headers the CPU translation units include first, with exactly the flags of their compile commands (read
    from the build.ninja torch writes, just before ninja runs), into <build_temp>/vitkernels-pch, which goes first on
    the include path. GCC then loads it instead of parsing torch's headers in each unit: 5-7 s less per unit (-O3,
    measured one unit at a time: bias_gelu.cpp ~14 -> 8-9 s, window_attention.cpp ~74 -> ~68 s), for ~25 s once
    (~300 MB). It is made again only when its command, the header, torch's version or the compiler's changes (a
    stamp beside it), and then every unit is recompiled (their dependency files list what they parsed, not what it
    holds), so that an incremental build recompiles only the changed units. Where it cannot be made (not GCC, another
    torch's internals, a failed compile) the units parse the header as they would anyway, with a note; -Winvalid-pch
    warns where GCC finds it but cannot use it (other flags)."""

    class PrecompiledHeaderBuild(build_extension):
        def build_extensions(self):
            from torch.utils import cpp_extension

            pch_dir = os.path.abspath(os.path.join(self.build_temp, "vitkernels-pch"))
            run_ninja = getattr(cpp_extension, "_run_ninja_build", None)
            if run_ninja is None or not self.use_ninja:
                print("vitkernels: no precompiled header (this torch's build has no ninja step to hook)",
                      file=sys.stderr)
                return super().build_extensions()
            for ext in self.extensions:
                if pch_dir not in ext.include_dirs:
                    ext.include_dirs.insert(0, pch_dir)
                cxx_flags = ext.extra_compile_args.setdefault("cxx", [])
                if "-Winvalid-pch" not in cxx_flags:
                    cxx_flags.append("-Winvalid-pch")

            def run_ninja_after_precompiling(build_directory, *args, **kwargs):
                try:
                    precompile_header(os.path.join(build_directory, "build.ninja"), pch_dir)
                except Exception as e:  # the units then parse the header themselves: slower, the same objects
                    print(f"vitkernels: no precompiled header ({type(e).__name__}: {e})", file=sys.stderr)
                    if os.path.isdir(pch_dir):  # objects made with the one it leaves behind are stale too
                        shutil.rmtree(pch_dir, ignore_errors=True)
                        remove_objects(build_directory)
                return run_ninja(build_directory, *args, **kwargs)

            cpp_extension._run_ninja_build = run_ninja_after_precompiling
            try:
                super().build_extensions()
            finally:
                cpp_extension._run_ninja_build = run_ninja

    return PrecompiledHeaderBuild


def precompile_header(ninja_file, pch_dir):
    """Compile PRECOMPILED_HEADER with the cxx, cflags and post_cflags of ``ninja_file`` (the command ninja runs for
    each C++ unit, with the header as input and a .gch as output) into pch_dir, unless its stamp says it is there."""
    import hashlib
    import subprocess

    variables = {}
    with open(ninja_file) as f:
        for line in f:
            name, sep, value = line.partition(" = ")
            if sep and name in ("cxx", "cflags", "post_cflags"):
                variables[name] = value.strip()
    if set(variables) != {"cxx", "cflags", "post_cflags"}:
        raise RuntimeError(f"{ninja_file} lacks cxx / cflags / post_cflags")
    version = subprocess.run(f"{variables['cxx']} --version", shell=True, capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version:  # GCC's; clang reads a precompiled header only with -include-pch
        raise RuntimeError(f"the compiler is not GCC: {version.strip()[:80]!r}")
    import torch

    header = os.path.join(ROOT, "csrc", "include", PRECOMPILED_HEADER)
    gch = os.path.join(pch_dir, PRECOMPILED_HEADER + ".gch")
    command = (f"{variables['cxx']} {variables['cflags']} -x c++-header {header} -o {gch}.tmp "
               f"{variables['post_cflags']}")
    with open(header, "rb") as f:
        identity = "\0".join([command, version, torch.__version__, str(torch.version.git_version), f.read().decode()])
    stamp = hashlib.sha256(identity.encode()).hexdigest()
    stamp_file = gch + ".stamp"
    if os.path.exists(gch) and os.path.exists(stamp_file):
        with open(stamp_file) as f:
            if f.read() == stamp:
                return
    os.makedirs(os.path.dirname(gch), exist_ok=True)
    print("vitkernels: precompiling csrc/include/" + PRECOMPILED_HEADER, file=sys.stderr)
    proc = subprocess.run(command, shell=True, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    os.replace(gch + ".tmp", gch)
    with open(stamp_file, "w") as f:
        f.write(stamp)
    remove_objects(os.path.dirname(ninja_file))


def remove_objects(build_directory):
    """Remove the build's objects, so that ninja compiles every unit again: the units' dependency files list what
    they parsed, not what a precompiled header held, so ninja would not rebuild them when it changes (a new torch,
    a changed header) or goes."""
    for folder, _, files in os.walk(build_directory):
        for name in files:
            if name.endswith(".o"):
                os.remove(os.path.join(folder, name))


def cpu_has_avx512() -> bool:
    """Whether this machine's CPU has the AVX-512 subsets the kernels use (csrc/cpu/cpu_isa.h's best_isa); True
    where that cannot be read (not Linux / x86), so that nothing is left out there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= set(flags)


ext_modules, cmdclass = extension_modules()

setup(
    name="vitkernels",
    version="0.1.0",
    description="Fused Triton / C++ / CUDA kernels for Vision Transformers (ViT, DeiT, Swin, DINO, MAE, MSN)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vitkernels", "vitkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        # vitkernels.compat.transformers / vitkernels.compat.monai (imported lazily; the layers they patch are those
        # of these versions). Neither requires a particular torch: an installed torch is kept.
        "transformers": ["transformers>=5,<6"],
        "monai": ["monai>=1.6,<1.7", "einops>=0.8"],
        # Tests and benchmarks. timm is installed separately with --no-deps (its torchvision requirement would
        # replace a CPU torch by a CUDA build); these are the packages it needs for its Swin / ViT / DeiT code.
        "dev": ["triton>=3.0", "pytest>=7", "pytest-benchmark>=4", "numpy", "matplotlib",
                "pillow", "pyyaml", "huggingface_hub", "safetensors"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
