"""Op: a Linear layer with an optional fused GELU, ``act(x W^T + b)`` (see :mod:`vitkernels.reference.linear`).

Backends:

* ``reference``: :func:`torch.nn.functional.linear` (+ GELU). On CUDA this is cuBLAS, which is what we want.
* ``native`` (CPU, float32, PyTorch built with oneDNN): ``torch.ops.mkldnn._linear_pointwise``, oneDNN's inner
  product, the op inductor's mkldnn fusion pass emits, with the bias and the GELU as oneDNN post-ops. Why: on CPUs
  where PyTorch's ``F.linear`` (aten ``addmm`` -> MKL ``sgemm``) takes MKL's generic code path (AMD EPYC: the CI
  machine), oneDNN's own JIT GEMM took about half the time at Swin-T's shapes in quick interleaved checks on the
  shared, loaded 2-core CI box (not a benchmark), with results equal up to fp32 GEMM rounding (relative error
  ~3e-7 against float64).
  bfloat16 is not served: there ``F.linear`` was the faster of the two in the same quick check (8.8 vs 12.4 ms at
  3136x384x1536), so ``auto`` leaves it to the reference.

The native op ``vitkernels::onednn_linear(x, weight, bias, activation)`` has its CPU kernel in C++ (csrc/cpu/linear.cpp;
without vitkernels._C it is a Python custom op with the same body) and its fake and autograd from here, so
``torch.compile(fullgraph=True)`` keeps it. Its backward, all GEMMs in oneDNN:

* ``grad_x = g W``: ``_linear_pointwise(g, W^T)`` with the weight's transposed *view* (oneDNN reorders its weight
  operand on every call anyway; copying ``W^T`` first cost up to 2x at Swin-T's stage-4 shapes, where the weight
  is large and M small). Summed over Swin-T's 16 Linear shapes at batch 2 (two threads, interleaved quick check on
  the 2-core dev VM, not a benchmark): 29.1 ms, against 35.5 ms for MKL's ``torch.mm(g, W)`` and 41.0 ms with the
  copy.
* ``grad_W = g^T x``: MKL's ``torch.mm(g.t(), x)``. oneDNN's inner product reduces over its operands' last dim, so
  it needs both activations transposed (M last): as contiguous copies ATen's transposing copy alone costs as much
  as the GEMM at stage 1 (8.5 ms for 12544 x 384 on one thread); as strided views oneDNN copies them itself. Same
  quick check: 35.8 ms for ``torch.mm``, 39.1 ms oneDNN on the views, 49.2 ms oneDNN on contiguous copies (what
  this backward did before). ATen's ``mkldnn_linear_backward_weights`` refuses dense CPU tensors.
* ``grad_b = g.sum(0)``.

Which library serves a CPU float32 GEMM by default (``auto`` and the layers' :func:`layer_linear`) is a per-machine
fact, :data:`CPU_GEMM` (:func:`choose_cpu_gemm`): ``"aten"`` (``F.linear``: MKL's ``sgemm``) on an Intel CPU with a
PyTorch built with MKL, where MKL runs its own Intel-tuned kernels; ``"onednn"`` elsewhere (AMD: see above). On a
2-core Intel Xeon (AVX-512, AMX; torch 2.13), per Swin-T Linear shape (interleaved medians), oneDNN ran at 0.80-1.00x
ATen's speed forward + backward at batch 2 and 0.87-0.99x forward at batch 4 (1.07-1.09x only at stage 4's qkv and
fc1); summed over the model's Linears ATen was 6-8% faster (224 vs 242 ms, 128 vs 136 ms), and the patched Swin-T
training step ran 1.28x timm eager with it against 1.23x with oneDNN (12 paired rounds). ``$VITKERNELS_CPU_GEMM``
(``aten`` / ``onednn``, read at import) overrides the choice; ``backend="native"`` still runs oneDNN.

Eager calls skip the custom op's dispatch, which costs more than the GEMM at small shapes: without autograd they
call oneDNN's op directly, with autograd ``vitkernels::onednn_linear_eager``, the same forward and backward recorded
by a C++ autograd Function (csrc/cpu/linear.cpp; without vitkernels._C the Python ``autograd.Function``
``_EagerOneDNNLinear``). Under ``torch.compile`` the custom op is what gets traced.

With an activation, the op's backward recomputes the pre-activation with one more GEMM (it cannot save it: the
fused post-op never materialises it). :func:`linear` avoids that cost when autograd is recording: it runs the op
without the activation and applies :func:`torch.nn.functional.gelu` after it, whose autograd saves the
pre-activation (one elementwise pass instead of a GEMM in the backward); without autograd (inference) it uses the
fused post-op.
"""
from __future__ import annotations

import os
import platform
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vitkernels import _native, dispatch
from vitkernels._validation import check_same_device, check_same_dtype, check_shape, check_tensor
from vitkernels.ops._library import needs_grad
from vitkernels.reference import linear as reference

op = dispatch.op("linear", "act(x W^T + b): a Linear layer with an optional fused GELU (CPU: oneDNN, or MKL on Intel)")

ACTIVATIONS = reference.ACTIVATIONS
NATIVE_DTYPES = (torch.float32,)

# activation -> (oneDNN post-op attr, its scalars, its algorithm), as inductor's mkldnn fusion writes them
_POST_OPS = {"none": ("none", [], ""), "gelu": ("gelu", [None], "none"), "gelu_tanh": ("gelu", [None], "tanh")}


_layer_fast_path = None  # layer_linear's direct call: vitkernels::onednn_linear_eager, set below where it exists

CPU_GEMM_ENV_VAR = "VITKERNELS_CPU_GEMM"
CPU_GEMM_LIBRARIES = ("aten", "onednn")


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN (mkldnn) and its fused linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_vendor() -> str:
    """The CPU's vendor id (``"GenuineIntel"``, ``"AuthenticAMD"``, ...; ``""`` if unknown): ``/proc/cpuinfo`` on
    Linux, else the tail of :func:`platform.processor` (Windows: ``"Intel64 Family 6 Model 85 ..., GenuineIntel"``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    tail = platform.processor().rsplit(",", 1)[-1].strip()
    return tail if tail.startswith(("Genuine", "Authentic")) else ""


def choose_cpu_gemm(env: Optional[str] = None, vendor: Optional[str] = None,
                    mkl: Optional[bool] = None, onednn: Optional[bool] = None) -> Tuple[str, str]:
    """``(library, why)``: the library for CPU float32 GEMMs, ``"aten"`` (``F.linear``) or ``"onednn"``. The
    arguments default to this process's facts (``$VITKERNELS_CPU_GEMM``, :func:`cpu_vendor`, whether PyTorch has MKL
    and oneDNN); passing them decides for another machine."""
    env = os.environ.get(CPU_GEMM_ENV_VAR, "") if env is None else env
    vendor = cpu_vendor() if vendor is None else vendor
    mkl = torch.backends.mkl.is_available() if mkl is None else mkl
    onednn = onednn_available() if onednn is None else onednn
    asked = env.strip().lower()
    if asked:
        if asked not in CPU_GEMM_LIBRARIES:
            raise ValueError(f"${CPU_GEMM_ENV_VAR} must be one of {CPU_GEMM_LIBRARIES}, got {env!r}")
        if asked == "onednn" and not onednn:
            raise ValueError(f"${CPU_GEMM_ENV_VAR}=onednn, but this PyTorch build has no oneDNN")
        return asked, f"${CPU_GEMM_ENV_VAR}={asked}"
    if not onednn:
        return "aten", "this PyTorch build has no oneDNN"
    if mkl and vendor == "GenuineIntel":
        return "aten", "an Intel CPU and a PyTorch built with MKL: MKL's sgemm runs its Intel-tuned kernels"
    return "onednn", (f"a {vendor or 'non-Intel'} CPU" if mkl else "a PyTorch built without MKL") + \
        ": oneDNN's JIT GEMM (MKL's sgemm takes its generic code path off Intel CPUs)"


# The library of this process's CPU float32 GEMMs (layer_linear, and what ``auto`` picks for the linear op)
CPU_GEMM, CPU_GEMM_REASON = choose_cpu_gemm()

GRAD_X_MM_MIN_IN_FEATURES = 768
_AVX2_CPU = torch.backends.cpu.get_cpu_capability() == "AVX2"  # grad_x_through_mm's default, asked once per process


def _avx2_only(capability: Optional[str]) -> bool:
    """Whether the CPU's best instruction set is AVX2: ``capability`` as ``torch.backends.cpu.get_cpu_capability()``
    names it, None for this process's CPU (asked once, :data:`_AVX2_CPU`)."""
    return _AVX2_CPU if capability is None else capability == "AVX2"


def grad_x_through_mm(in_features: int, capability: Optional[str] = None) -> bool:
    """Whether the oneDNN Linear's input gradient ``g W`` (g (M, N), W (N, K = in_features)) goes through ATen's
    ``mm`` instead of oneDNN's inner product on the weight's transposed view: on CPUs whose best instruction set is
    AVX2 (``capability``, default ``torch.backends.cpu.get_cpu_capability()``, is ``"AVX2"``; where oneDNN is the CPU
    GEMM that means an AMD Zen 1-3), for K >= :data:`GRAD_X_MM_MIN_IN_FEATURES`. Why: on a 2-core AMD EPYC Zen 2
    (alternating calls, M = 98 ... 3136) oneDNN's product took 1.15-1.54x mm's time at K = 768 / 3072 with N >= 768
    (Swin-T stage 4's Linears) and at K = 1536, N = 384 (stage 3's fc2) whatever M, 0.95-1.18x at K = 768, N = 192,
    0.82-1.03x at K = 192 and 384, where it stays (the Swin-T training step: 1.024-1.035x with the rule); oneDNN's
    forward ``x W^T`` (the weight not transposed) was the faster one summed over Swin-T's shapes (0.86x MKL's time;
    per shape see :func:`forward_through_mm`). Not measured on AVX-512 AMD CPUs (Zen 4), where oneDNN keeps the
    product."""
    return _avx2_only(capability) and in_features >= GRAD_X_MM_MIN_IN_FEATURES


FORWARD_MM_MIN_ROWS = 512
FORWARD_MM_MIN_IN_FEATURES = 192
FORWARD_MM_MAX_WEIGHT = 384 * 1536


def forward_through_mm(rows: int, in_features: int, out_features: int, capability: Optional[str] = None) -> bool:
    """Whether :func:`layer_linear`'s forward product ``x W^T + b`` (x (rows, K = in_features), W (N =
    out_features, K)) runs through ATen's GEMM (MKL's ``sgemm``) instead of oneDNN's inner product, its backward
    unchanged: on AVX2-only CPUs (``capability`` as in :func:`grad_x_through_mm`) where oneDNN is the CPU GEMM, for
    mid-size weights, K >= :data:`FORWARD_MM_MIN_IN_FEATURES` and N K <= :data:`FORWARD_MM_MAX_WEIGHT`, and at least
    :data:`FORWARD_MM_MIN_ROWS` rows. Why: on a 2-core AMD EPYC Zen 2 (interleaved forward products, Swin-T's
    shapes) oneDNN's took 1.02-1.25x MKL's time there (Swin-T stages 2 and 3 at batch 4 and stage 2 at batch 1:
    the worst its (3136, 192) x (192, 192) projection), while it stays the faster one at K = 96 (stage 1: 0.77-0.93x)
    and for the large stage-4 weights (0.80-0.96x); with fewer rows (stage 3 at batch 1: 196) MKL's product measured
    faster alone but the patched Swin-T ran 3.6% slower with it. The rule's whole-model effect, interleaved with
    the plain path in one process: Swin-T inference 1.022-1.028x at batch 4, 0.996-1.016x at batch 1, 1.015x at
    batch 2, 1.008x at batch 8; training steps and Swin V2-T 1.00x. Not measured on AVX-512 AMD CPUs (Zen 4), where
    oneDNN keeps every product."""
    return (_avx2_only(capability) and rows >= FORWARD_MM_MIN_ROWS and in_features >= FORWARD_MM_MIN_IN_FEATURES
            and in_features * out_features <= FORWARD_MM_MAX_WEIGHT)


OWN_GEMM_ENV_VAR = "VITKERNELS_OWN_GEMM"


def own_gemm_takes_it(env: Optional[str] = None, capability: Optional[str] = None, built: Optional[bool] = None,
                      cpu_gemm: Optional[str] = None) -> Tuple[bool, str]:
    """``(takes_it, why)``: whether the layers' float32 CPU Linears (:func:`layer_linear`'s direct path) run their
    three products, ``x W^T + b`` forward and ``g W``, ``g^T x`` backward, through vitkernels' own packed GEMM
    (``vitkernels::cpu_gemm``, csrc/cpu/gemm.cpp) instead of oneDNN's / MKL's. By default on CPUs whose best
    instruction set is AVX2 (``capability`` as in :func:`grad_x_through_mm`) where oneDNN is the CPU GEMM
    (``cpu_gemm``, default :data:`CPU_GEMM`: a non-Intel CPU, an AMD Zen 1-3) and vitkernels._C has the GEMM
    (``built``). Why: on a 2-core AMD EPYC Zen 3 (x86 family 25 model 1, AVX2 only) MKL's and oneDNN's GEMMs ran
    Swin-T's Linear shapes at ~65-75% of the cores' FMA peak (independent FMAs: 216-234 GFLOP/s on both cores,
    2048^3 ``torch.mm``: ~150); the packed 6 x 16 register tile ran Swin-T b4's forward products 1.17x faster
    than the products the layers took before (oneDNN's, MKL's where :func:`forward_through_mm` said), summed and
    interleaved (1.11x with the caches flushed between calls; per shape 0.9-1.2x), its weight gradients 1.0-1.4x
    MKL's, and the patched Swin-T b4 inference step 1.06x, its training step 1.13x (interleaved, own GEMM on vs
    off). Not measured on a Zen 2 or Zen 1 (the rule takes them too). ``$VITKERNELS_OWN_GEMM`` (``env``: ``1`` /
    ``0``, read at import) overrides the rule (``1`` still needs vitkernels._C and oneDNN as the CPU GEMM: the
    Linears' other route is ``F.linear``). Not measured on AVX-512 CPUs, where oneDNN / MKL keep every product."""
    env = os.environ.get(OWN_GEMM_ENV_VAR, "") if env is None else env
    built = (_native.is_loaded() and hasattr(torch.ops.vitkernels, "cpu_gemm")) if built is None else built
    cpu_gemm = CPU_GEMM if cpu_gemm is None else cpu_gemm
    asked = env.strip()
    if asked not in ("", "0", "1"):
        raise ValueError(f"${OWN_GEMM_ENV_VAR} must be 0 or 1, got {env!r}")
    if not built:
        return False, "vitkernels._C is not built"
    if cpu_gemm != "onednn":
        return False, f"the layers' Linears run F.linear here (CPU GEMM {cpu_gemm!r})"
    if asked:
        return asked == "1", f"${OWN_GEMM_ENV_VAR}={asked}"
    if _avx2_only(capability):
        return True, "an AVX2 CPU where oneDNN is the GEMM (AMD Zen 1-3): measured faster on a Zen 3"
    return False, "not an AVX2-only CPU (oneDNN / MKL keep the products)"


OWN_GEMM_MIN_FEATURES = 32
OWN_GEMM_ANY_OUT_FEATURES = 128


def own_gemm_fits(in_features: int, out_features: int) -> bool:
    """Whether a Linear of these sizes runs on vitkernels' own GEMM where :data:`OWN_GEMM` is on: both >=
    :data:`OWN_GEMM_MIN_FEATURES`, and out_features a multiple of 16 or >= :data:`OWN_GEMM_ANY_OUT_FEATURES`. Why:
    its tile is 16 columns wide (AVX2); a ragged last panel of 8 columns runs a half-width tile, a narrower one goes
    through a scratch tile. On the Zen 3 (interleaved, 32768 rows, MONAI SwinUNETR f24's stage 0) it took 1.16-1.64x
    oneDNN's time at (K, N) = (24, 24), (96, 24), (24, 72) with whole tiles only; with the half-width tile its
    forward products there ran 0.74-1.02x oneDNN's speed, its weight gradients 0.8x (one noisy run), no gain to
    take, while every Swin-T shape (K, N >= 96, N a multiple of 16) and MONAI's 48-wide stage ran 1.1-1.4x faster
    than oneDNN."""
    return (min(in_features, out_features) >= OWN_GEMM_MIN_FEATURES
            and (out_features % 16 == 0 or out_features >= OWN_GEMM_ANY_OUT_FEATURES))


def runs_own_gemm(in_features: int, out_features: int) -> bool:
    """Whether a float32 CPU Linear of these sizes runs vitkernels' own GEMM in this process: :data:`OWN_GEMM`
    (read at call time) and :func:`own_gemm_fits`. The one decision for the layers' Linears, the linear op's native
    paths and the blocked MLP's GEMMs."""
    return OWN_GEMM and own_gemm_fits(in_features, out_features)


def _cpu_bf16_gemm_emulated() -> bool:
    """Whether this CPU's oneDNN runs bfloat16 GEMMs without bf16 instructions (no AVX512-BF16 / AMX-BF16: AVX2-only
    and older AVX-512 CPUs), i.e. emulated: there a bf16 ``F.linear`` took ~8x the float32 GEMM on the same operands
    (3136 x 384 x 1536, Zen 3: 102 vs 12.7 ms, conversions included)."""
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return is_supported is not None and torch.backends.mkldnn.is_available() and not is_supported()
    except Exception:  # pragma: no cover - an unusual build: keep autocast's own GEMM
        return False


CPU_BF16_GEMM_EMULATED = _cpu_bf16_gemm_emulated()
# the dtypes bf16 autocast casts a Linear's operands from (float64 ones it leaves alone, and so does autocast_linear)
_AUTOCAST_BF16_INPUTS = (torch.float32, torch.bfloat16)


def autocast_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    activation: Optional[str] = None) -> torch.Tensor:
    """The linear op under autocast: the reference (``F.linear``), whose operands autocast casts exactly as for timm,
    except under CPU bfloat16 autocast on a CPU whose bf16 GEMM is emulated (:data:`CPU_BF16_GEMM_EMULATED`), in
    eager mode: there the same product, autocast's ``bf16(x) bf16(W)^T + bf16(b)`` accumulated in float32 and
    rounded to bfloat16, runs through the float32 GEMM on the bf16-rounded operands (products of two bf16 values
    are exact in float32; only the summation order can differ from oneDNN's), forward and, through autograd, the
    backward's products too (their bf16 outputs rounded the same way). Costs: float32 copies of the operands, and
    autograd saves the activations in float32 instead of bfloat16. The activation runs on the bf16 output under
    the ambient autocast, as in the reference."""
    if not (CPU_BF16_GEMM_EMULATED and x.device.type == "cpu" and torch.get_autocast_dtype("cpu") is torch.bfloat16
            and all(t is None or t.dtype in _AUTOCAST_BF16_INPUTS for t in (x, weight, bias))
            and not torch.compiler.is_compiling()):
        return reference.linear(x, weight, bias, activation)
    with torch.autocast("cpu", enabled=False):
        y = F.linear(x.to(torch.bfloat16).float(), weight.to(torch.bfloat16).float(),
                     None if bias is None else bias.to(torch.bfloat16).float()).to(torch.bfloat16)
    if activation is None:
        return y
    return F.gelu(y, approximate=reference.GELU_APPROXIMATION[activation])


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias)``.

    Args:
        x: (..., K).
        weight: (N, K), as ``nn.Linear.weight``.
        bias: (N,) or None.
        activation: None, ``"gelu"`` (erf) or ``"gelu_tanh"``.
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (..., N), dtype of ``x``.

    Under autocast the call goes to :func:`autocast_linear` (the reference, whose operands autocast casts exactly as
    for timm; on CPUs without bf16 GEMM instructions its bf16 product through the float32 GEMM).
    """
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    check_tensor("weight", weight, ndim=2)
    check_shape("weight", weight, (None, x.shape[-1]), "(N, x.shape[-1])")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (weight.shape[0],), "weight.shape[0]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_same_device(x=x, weight=weight, bias=bias)
    if torch.is_autocast_enabled(x.device.type):
        return autocast_linear(x, weight, bias, activation)
    check_same_dtype(x=x, weight=weight, bias=bias)
    return op.select(dispatch.Call(x.device, x.dtype), backend)(x, weight, bias, activation)


def layer_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``linear(x, weight, bias, backend="auto")`` for a layer's own parameters (:class:`vitkernels.modules.Linear`,
    the fused Swin block's GEMMs), whose shapes the layer guarantees. Where oneDNN is the CPU GEMM (:data:`CPU_GEMM`),
    in eager mode, on CPU, in float32, without autocast, the call goes straight to ``vitkernels::onednn_linear_eager``
    (which checks its arguments in C++, records for autograd only when autograd is recording, and runs its forward
    through ATen's GEMM where :func:`forward_through_mm` says, the same in training and inference; all three products
    through vitkernels' own GEMM where :data:`OWN_GEMM` and :func:`own_gemm_fits` say), not through
    :func:`linear`'s Python checks and backend selection: ~40-50 us less per call (a (49, 96) x (96, 96) Linear:
    87 -> 45 us with autograd, one thread), about 50 calls per Swin-T forward. Off the CPU, or where :data:`CPU_GEMM`
    is ``"aten"`` (an Intel CPU), ``F.linear`` directly (every backend is ``F.linear`` off the CPU: cuBLAS). Anything
    else, or without vitkernels._C: :func:`linear`."""
    route = layer_linear_route(x, weight, bias)
    if route == "autocast":
        return autocast_linear(x, weight, bias)
    if route == "aten":
        return F.linear(x, weight, bias)
    if route == "onednn":
        N, K = weight.shape
        return _layer_fast_path(x, weight, bias, grad_x_through_mm(K), forward_through_mm(x.shape[:-1].numel(), K, N),
                                runs_own_gemm(K, N))
    return linear(x, weight, bias, backend="auto")


def layer_linear_route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> str:
    """Where :func:`layer_linear` sends this call: ``"aten"`` (``F.linear`` directly), ``"onednn"``
    (``vitkernels::onednn_linear_eager`` directly), ``"autocast"`` (:func:`autocast_linear`: CPU autocast where the
    bf16 GEMM is emulated) or ``"dispatch"`` (:func:`linear`, backend ``auto``)."""
    if CPU_BF16_GEMM_EMULATED and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return "autocast"
    if x.device.type != "cpu" or CPU_GEMM == "aten":
        return "aten"
    if (_layer_fast_path is not None and x.dtype is torch.float32 and weight.dtype is torch.float32
            and (bias is None or bias.dtype is torch.float32) and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        return "onednn"
    return "dispatch"


def layer_backend(backend: Optional[str]) -> str:
    """The linear op's backend for a layer of a model pinned to ``backend`` (None: ``$VITKERNELS_BACKEND`` or
    ``auto``): ``"reference"`` stays ``"reference"`` (``F.linear``); anything else is ``"auto"``, since there is no
    Triton GEMM (cuBLAS serves CUDA) and no float64 oneDNN path, and a model pinned to ``triton`` or ``native`` for
    its attention must not fail on its Linears."""
    return "reference" if dispatch.resolve_backend_name(backend) == "reference" else "auto"


@op.register("reference")
def _linear_reference(x, weight, bias, activation):
    return reference.linear(x, weight, bias, activation)


def _gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: str = "none"):
    """(M, K), (N, K) -> (M, N): ``act(a b^T + bias)`` in oneDNN. ``b`` may be strided (the backward passes the
    weight's transposed view: oneDNN reorders the weight operand into its blocked layout on every call anyway, and
    that reorder reads a transposed view about as fast as a contiguous one, so copying it first only adds a pass).
    Empty products (M, N or K zero) go to ATen, whose conventions (zeros for K = 0) oneDNN's primitive creation does
    not promise."""
    if a.numel() == 0 or b.numel() == 0:
        y = F.linear(a, b, bias)
        return y if activation == "none" else F.gelu(y, approximate=reference.GELU_APPROXIMATION[activation])
    attr, scalars, algorithm = _POST_OPS[activation]
    return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b, bias, attr, scalars, algorithm)


def _row_major(lead, n: int):
    """Strides of the leading dims of a contiguous (*lead, n) tensor."""
    strides, step = [], n
    for size in reversed(lead):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _linear_unviewed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str = "none"):
    """(..., K) -> (..., N) through :func:`_gemm`, returned as a tensor that is not a view. The (..., N) result
    of a 2D GEMM is naturally a view of it, and a custom op's or autograd.Function's output that is a view of a
    tensor made inside it may not be modified in place afterwards (autograd forbids it; timm's ``qkv += bias``
    does it; oneDNN's op given an N-D input returns such a view too). So the result takes the GEMM output's
    storage directly, with no view relation to it."""
    N, K = weight.shape
    rows = x.shape[:-1].numel()  # not reshape(-1, K): ambiguous when K = 0
    y = _gemm(x.reshape(rows, K), weight, bias, activation)
    return y.new_empty(0).set_(y.untyped_storage(), 0, (*x.shape[:-1], N), (*_row_major(x.shape[:-1], N), 1))


if onednn_available():

    def _onednn_linear_fake(x, weight, bias, activation):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    if _native.is_loaded() and hasattr(torch.ops.vitkernels, "onednn_linear"):
        # vitkernels._C defines the op with its CPU kernel in C++ (csrc/cpu/linear.cpp): a compiled graph calls it
        # for every Linear, forward and backward, and the Python body below costs ~40 us more per call
        _onednn_linear = torch.ops.vitkernels.onednn_linear.default
        torch.library.register_fake("vitkernels::onednn_linear")(_onednn_linear_fake)
    else:
        @torch.library.custom_op("vitkernels::onednn_linear", mutates_args=())
        def _onednn_linear_custom_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                     activation: str) -> torch.Tensor:
            if activation not in _POST_OPS:
                raise ValueError(f"onednn_linear: activation must be one of {tuple(_POST_OPS)}, got {activation!r}")
            return _linear_unviewed(x, weight, bias, activation)

        _onednn_linear_custom_op.register_fake(_onednn_linear_fake)
        _onednn_linear = torch.ops.vitkernels.onednn_linear.default

    def _setup_context(ctx, inputs, output):
        x, weight, bias, ctx.activation = inputs
        ctx.save_for_backward(x, weight, bias)

    def _linear_grads(grad, x, weight, bias, activation, needs_input_grad, gemm):
        """(grad_x, grad_W, grad_b) of ``act(x W^T + b)`` (None where not needed), the GEMMs through ``gemm(a, b)`` =
        ``a b^T`` (the custom op where the backward is traced or differentiated, oneDNN's op directly in eager)."""
        N, K = weight.shape
        rows = x.shape[:-1].numel()
        g = grad.reshape(rows, N)
        x2 = x.reshape(rows, K)
        if activation != "none":
            pre = gemm(x2, weight, bias)  # recomputed: the fused post-op never stored it
            g = torch.ops.aten.gelu_backward(g, pre, approximate=reference.GELU_APPROXIMATION[activation])
        grad_x = grad_w = grad_b = None
        if needs_input_grad[0]:
            grad_x = (torch.mm(g, weight) if grad_x_through_mm(K) else gemm(g, weight.t())).view(x.shape)
        if needs_input_grad[1]:
            grad_w = torch.mm(g.t(), x2)
        if bias is not None and needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b

    def _custom_op_gemm(a, b, bias=None):
        return _onednn_linear(a, b, bias, "none")

    def _backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        return (*_linear_grads(grad, x, weight, bias, ctx.activation, ctx.needs_input_grad, _custom_op_gemm), None)

    class _EagerOneDNNLinear(torch.autograd.Function):
        """``x W^T + b`` with autograd in eager mode: the custom op's forward and backward, through an
        ``autograd.Function``, whose dispatch costs ~150 us less per forward + backward than the custom op's
        (quick check, one thread: a (49, 96) x (96, 96) Linear's forward + backward took 348 us through the
        custom op, 196 us this way, 100 us with ``F.linear``): ~106 Linear calls per Swin-T training step.
        torch.compile keeps the custom op (inductor's lowering of the raw oneDNN op wants constant weights)."""

        @staticmethod
        def forward(ctx, x, weight, bias, grad_x_mm=False):
            # grad_x_mm: the C++ op's argument, the same answer as _linear_grads' own grad_x_through_mm
            ctx.save_for_backward(x, weight, bias)
            return _linear_unviewed(x, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            x, weight, bias = ctx.saved_tensors
            # create_graph (double backward): the differentiable custom op; otherwise oneDNN's op directly
            gemm = _custom_op_gemm if torch.is_grad_enabled() else _gemm
            return (*_linear_grads(grad, x, weight, bias, "none", ctx.needs_input_grad, gemm), None)

    torch.library.register_autograd("vitkernels::onednn_linear", _backward, setup_context=_setup_context)

    # The eager autograd path: the C++ Function of vitkernels._C where it is built (~75 us less Python per Linear
    # forward + backward than the autograd.Function above: 361 -> 284 us at (49, 96) x (96, 96), one thread), else
    # that Function. It is layer_linear's fast path too.
    if _native.is_loaded() and hasattr(torch.ops.vitkernels, "onednn_linear_eager"):
        _eager_linear = _layer_fast_path = torch.ops.vitkernels.onednn_linear_eager.default
    else:
        _eager_linear = _EagerOneDNNLinear.apply

    def _native_reason(call: dispatch.Call) -> Optional[str]:
        if call.device.type != "cpu":
            return f"device type {call.device.type!r} not supported (the oneDNN linear is CPU only; CUDA: cuBLAS)"
        if call.dtype not in NATIVE_DTYPES:
            return (f"dtype {str(call.dtype).replace('torch.', '')} not supported (float32 only: for bfloat16 "
                    "F.linear measured faster than oneDNN's _linear_pointwise)")
        return None

    def _native_preferred(call: dispatch.Call) -> Optional[str]:
        if CPU_GEMM != "onednn":
            return f"ATen's GEMM is this machine's CPU GEMM ({CPU_GEMM_REASON})"
        return None

    @op.register("native", _native_reason, auto_checks=(_native_preferred,))
    def _linear_native(x, weight, bias, activation):
        recording = needs_grad(x, weight, bias)
        eager = not torch.compiler.is_compiling()
        if runs_own_gemm(weight.shape[1], weight.shape[0]):
            # vitkernels' own GEMM for the three products (own_gemm_takes_it), eager and compiled alike: the C++
            # autograd Function in eager training, vitkernels::cpu_gemm (fake and autograd below) elsewhere
            y = (_eager_linear(x, weight, bias, False, False, True) if eager and recording
                 else _own_gemm_linear(x, weight, bias))
            return y if activation is None else F.gelu(y, approximate=reference.GELU_APPROXIMATION[activation])
        if eager and not recording:
            # Eager without autograd (inference): oneDNN's op directly. The custom op's dispatch (autograd key, fake
            # registration, Python body) costs ~25 us a call, ~3% of a Swin-T inference at batch 4; under
            # torch.compile the custom op stays (inductor's lowering of mkldnn._linear_pointwise wants constant
            # weights).
            return _linear_unviewed(x, weight, bias, "none" if activation is None else activation)
        if eager:
            y = _eager_linear(x, weight, bias, grad_x_through_mm(weight.shape[1]))
            return y if activation is None else F.gelu(y, approximate=reference.GELU_APPROXIMATION[activation])
        if activation is not None and recording:
            # autograd recording: keep the pre-activation (F.gelu saves it) rather than recompute a GEMM backward
            y = _onednn_linear(x, weight, bias, "none")
            return F.gelu(y, approximate=reference.GELU_APPROXIMATION[activation])
        return _onednn_linear(x, weight, bias, "none" if activation is None else activation)

else:
    op.mark_missing("native", "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")


if _native.is_loaded() and hasattr(torch.ops.vitkernels, "cpu_gemm"):
    # vitkernels::cpu_gemm(a, b, bias): a (..., K) @ b (K, N) [+ bias], vitkernels' own packed CPU GEMM (float32, any
    # strides; csrc/cpu/gemm.cpp), the products of layer_linear's Linears where OWN_GEMM says. Its fake and its
    # autograd (the gradients through the same op, so they are differentiable in turn).
    @torch.library.register_fake("vitkernels::cpu_gemm")
    def _cpu_gemm_fake(a, b, bias=None):
        return a.new_empty((*a.shape[:-1], b.shape[1]))

    def _cpu_gemm_setup_context(ctx, inputs, output):
        a, b, bias = inputs
        ctx.has_bias = bias is not None
        # b a transposed view of a row-major matrix (the Linear's W^T): its gradient is given as the transpose of a
        # row-major product, so the transposes cancel on the way to W's gradient (no copy; under torch.compile a
        # plain (K, N) gradient of W^T was copied into W's layout: ~70 ms per Swin-T b2 training step)
        ctx.b_transposed = b.shape[0] > 1 and b.stride(0) == 1
        ctx.save_for_backward(a, b)

    def _cpu_gemm_backward(ctx, grad):
        a, b = ctx.saved_tensors
        gemm = torch.ops.vitkernels.cpu_gemm
        K, N = b.shape
        rows = a.shape[:-1].numel()
        grad_a = gemm(grad, b.t()) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            a2, g2 = a.reshape(rows, K), grad.reshape(rows, N)
            grad_b = gemm(g2.t(), a2).t() if ctx.b_transposed else gemm(a2.t(), g2)
        grad_bias = grad.reshape(rows, N).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_a, grad_b, grad_bias

    torch.library.register_autograd("vitkernels::cpu_gemm", _cpu_gemm_backward, setup_context=_cpu_gemm_setup_context)

    def _own_gemm_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x W^T + b``, (..., K) -> (..., N), through ``vitkernels::cpu_gemm`` (the weight's transposed view read
        in place; a fresh output, no view of another tensor)."""
        return torch.ops.vitkernels.cpu_gemm(x, weight.t(), bias)

# Whether this process's layers run their CPU Linears through vitkernels' own GEMM (layer_linear), and why
OWN_GEMM, OWN_GEMM_REASON = own_gemm_takes_it()
