"""Op: a transformer MLP, ``gelu(x W1^T + b1) W2^T + b2`` (see :mod:`vitkernels.reference.gelu_mlp`).

Backends:

* ``reference``: ``F.linear`` -> ``F.gelu`` -> ``F.linear``.
* ``native`` (CPU, float32 / float64; ``torch.ops.vitkernels.gelu_mlp`` from ``csrc/cpu/gelu_mlp.cpp``): by blocks
  of rows, each task running fc1 on its block into a ~512 KB buffer, the bias + GELU in place, and fc2 into the
  output, so the (M, H) hidden activation is never materialised: it is written, rewritten and read while it is in
  the core's cache instead of going through memory, and no (M, H) tensor is allocated. The second matters most on
  CPU, where glibc hands a tensor of tens of MB back to the kernel when it is freed and page-faults a fresh one in
  on the next call: at Swin-T stage 1, batch 4 (M = 12544, C = 96, H = 384) that 19 MB hidden cost ~3 ms of page
  faults per block inside the fc1 GEMM (2-core Intel Xeon, glibc's default allocator). With the hidden buffer
  reused (a caching allocator, or glibc keeping the memory) the blocked op and the unblocked sequence ran within a
  few percent of each other (0.95-0.99x at M = 6272-12544, C = 96); with the page faults, 1.7x at M = 25088.
  Each block's GEMMs re-read the weights, so ``auto`` takes the native op only where both weights together fit
  in :data:`AUTO_MAX_WEIGHT_BYTES` and the hidden activation is at least :data:`AUTO_MIN_HIDDEN_BYTES` (at
  C = 192, 2 x 590 KB of weights, it ran 0.79-0.95x the unblocked sequence).

Training (autograd recording) runs ``gelu_mlp_train``: the same blocks, keeping fc1's output ``x W1^T`` (M, H) for
the backward (the GELU's output is not kept), and ``gelu_mlp_backward`` by blocks too: per block it recomputes the
GELU, adds ``g^T h`` into the fc2 weight gradient, forms the hidden gradient and its GELU derivative in cache and
adds ``grad_pre^T x`` into the fc1 weight gradient (per-thread sums, added in thread order: deterministic for a thread
count), so none of the (M, H) tensors of the unblocked backward (the GELU output, the hidden gradient, the
pre-activation gradient) is written. Swin-T stage 1 (C = 96, 2-core Xeon, fwd + bwd of the MLP against fc1 GEMM +
bias_gelu + fc2 GEMM under autograd): 1.07-1.27x at M = 6272, 1.15-1.22x at M = 12544; at C = 192 0.91-0.97x
(``auto`` does not take it there); the whole Swin-T training step (b2), where only stage 1 takes it, 1.01-1.03x.
Under ``create_graph`` the backward is the differentiable recomputing formula of
``gelu_mlp`` itself (the op stores nothing; its backward recomputes the hidden pre-activation with ATen ops), so
double backward works on every path.

``vitkernels::gelu_mlp_eager`` (csrc/cpu/gelu_mlp.cpp) is the same MLP unblocked on vitkernels' own GEMM, for the
layers where the blocks do not pay (the weights too large to re-read per block: Swin-T stages 2-4) and the Linears
run the own GEMM (:func:`eager_takes_it`): fc1's GEMM applies bias + GELU as it stores its tiles (keeping the
pre-activation beside under autograd) and the backward's ``g W2`` multiplies by the GELU's derivative and sums b1's
gradient as it stores its tiles, so neither direction spends a pass of its own over the (M, H) hidden activation or
its gradient (the ``bias_gelu`` op's forward and backward). A C++ autograd Function, eager only; its
``create_graph`` backward is differentiable ATen ops. Zen 3, 2 threads, interleaved with fc1 + ``bias_gelu`` + fc2
under autograd: the MLP's fwd + bwd 1.01-1.03x at (1568, 384) and (784, 384), 1.10x at (3136, 192), 1.035x at
(196, 768); inference 1.01-1.03x.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from vitkernels import _native, dispatch
from vitkernels._validation import check_same_device, check_same_dtype, check_shape, check_tensor
from vitkernels.ops import linear as linear_op
from vitkernels.ops._library import needs_grad, refuse_double_backward
from vitkernels.reference import gelu_mlp as reference

op = dispatch.op("gelu_mlp", "gelu(x W1^T + b1) W2^T + b2: a transformer MLP, its hidden activation kept in cache")

APPROXIMATIONS = ("none", "tanh")
NATIVE_DTYPES = (torch.float32, torch.float64)
AUTO_MAX_WEIGHT_BYTES = 512 * 1024  # both weights: re-read from L2 by every block's GEMMs
AUTO_MIN_HIDDEN_BYTES = 8 * 1024 * 1024  # below this the hidden tensor is cheap to allocate and stays in cache


def gelu_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    approximate: str = "none",
    *,
    block_rows: int = 0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``gelu(x W1^T + b1) W2^T + b2``, timm's ``Mlp`` forward.

    Args:
        x: (..., C).
        w1, b1: fc1's weight (H, C) and bias (H,) or None.
        w2, b2: fc2's weight (N, H) and bias (N,) or None.
        approximate: ``"none"`` (erf) or ``"tanh"``, as :func:`torch.nn.functional.gelu`.
        block_rows: rows per block of the native backend (0: chosen from H, ~512 KB of hidden activation).
        backend: see :mod:`vitkernels.dispatch`.

    Returns:
        (..., N), dtype of ``x``.
    """
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    check_tensor("w1", w1, ndim=2)
    check_tensor("w2", w2, ndim=2)
    C, H, N = x.shape[-1], w1.shape[0], w2.shape[0]
    check_shape("w1", w1, (None, C), "(H, x.shape[-1])")
    check_shape("w2", w2, (None, H), "(N, w1.shape[0])")
    if b1 is not None:
        check_tensor("b1", b1, ndim=1)
        check_shape("b1", b1, (H,), "w1.shape[0]")
    if b2 is not None:
        check_tensor("b2", b2, ndim=1)
        check_shape("b2", b2, (N,), "w2.shape[0]")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if not isinstance(block_rows, int) or block_rows < 0:
        raise ValueError(f"block_rows must be an int >= 0, got {block_rows!r}")
    check_same_device(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    check_same_dtype(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    return op.select(_call(x, w1, w2), backend)(x, w1, b1, w2, b2, approximate, block_rows)


def _call(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> dispatch.Call:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return dispatch.Call(x.device, x.dtype, {"weight_bytes": (w1.numel() + w2.numel()) * w1.element_size(),
                                             "hidden_bytes": rows * w1.shape[0] * x.element_size()})


@op.register("reference")
def _gelu_mlp_reference(x, w1, b1, w2, b2, approximate, block_rows):
    return reference.gelu_mlp(x, w1, b1, w2, b2, approximate)


def auto_prefers_native(call: dispatch.Call) -> Optional[str]:
    """``None`` where the blocked native op pays (small weights, a large hidden activation), else why not."""
    weight_bytes, hidden_bytes = call.details.get("weight_bytes", 0), call.details.get("hidden_bytes", 0)
    if weight_bytes > AUTO_MAX_WEIGHT_BYTES:
        return (f"the weights ({weight_bytes} bytes) exceed {AUTO_MAX_WEIGHT_BYTES}: every block would re-read them "
                "from memory")
    if hidden_bytes < AUTO_MIN_HIDDEN_BYTES:
        return f"the hidden activation ({hidden_bytes} bytes) is below {AUTO_MIN_HIDDEN_BYTES}: cheap unblocked"
    return None


def layers_take_it(cpu_gemm: Optional[str] = None, capability: Optional[str] = None) -> bool:
    """Whether layers' fused CPU paths (the Swin block's) run their MLP as this op where ``auto`` prefers it, given
    the CPU GEMM library (default :data:`vitkernels.ops.linear.CPU_GEMM`) and the CPU's best instruction set
    (default ``torch.backends.cpu.get_cpu_capability()``): where ATen's GEMM is the CPU GEMM (the op's blocks call
    it), and where oneDNN is but the CPU's best is AVX2 (AMD Zen 1-3), where ATen's ``mm`` in blocks beat oneDNN's
    GEMMs on the whole (M, H) hidden. Measured on a 2-core AMD EPYC Zen 2, glibc's default allocator, each variant in
    its own process: the Swin-T stage-1 block 1.19x at b8 inference (its 38-MB hidden is above glibc's 32-MB ceiling
    for reusing freed memory, so the unblocked path page-faults a fresh one in at every call) and 1.08x fwd + bwd at
    b2 (against the build before, which also lacked three small attention-kernel changes: ~1-3% of the block); the
    whole Swin-T step ~1.00-1.01x at b2 / b4 (its 9.6 / 19-MB hiddens stay in glibc's heap). Elsewhere (oneDNN on
    AVX-512 CPUs) the unblocked path's oneDNN GEMMs stay."""
    cpu_gemm = linear_op.CPU_GEMM if cpu_gemm is None else cpu_gemm
    avx2 = linear_op._AVX2_CPU if capability is None else capability == "AVX2"
    return cpu_gemm == "aten" or avx2


def eager_takes_it(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor) -> bool:
    """Whether a layer's fused path runs its MLP (``x`` (..., C), fc1 ``w1`` (H, C) / ``b1``, fc2 ``w2`` (N, H)) as
    ``vitkernels::gelu_mlp_eager``: where vitkernels._C has it, the operands are float32 and both Linears would run
    :func:`vitkernels.ops.linear.layer_linear`'s direct path (eager, CPU, no autocast) on vitkernels' own GEMM
    (:func:`vitkernels.ops.linear.runs_own_gemm`), which the op's three products per direction use."""
    return (_EAGER_OP_BUILT and x.dtype is torch.float32 and w2.dtype is torch.float32
            and linear_op.layer_linear_route(x, w1, b1) == "onednn" and _own_gemm(w1, w2))


_EAGER_OP_BUILT = _native.is_loaded() and hasattr(torch.ops.vitkernels, "gelu_mlp_eager")


def eager_op_built() -> bool:
    """Whether vitkernels._C has ``vitkernels::gelu_mlp_eager`` (what :func:`eager_takes_it` needs first)."""
    return _EAGER_OP_BUILT


def compiled_takes_it(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor) -> bool:
    """Whether a layer's fused path runs its MLP as ``vitkernels::gelu_mlp_own`` (:func:`own_gemm_mlp`) while
    torch.compile traces it, :func:`eager_takes_it`'s twin: where vitkernels._C has the op, float32 CPU operands
    without autocast, and both Linears would run on vitkernels' own GEMM in the compiled graph (the linear op's
    native backend, ``vitkernels::cpu_gemm``: oneDNN as this machine's CPU GEMM and
    :func:`vitkernels.ops.linear.runs_own_gemm`)."""
    return (_OWN_OP_BUILT and torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype is torch.float32 and w1.dtype is torch.float32 and w2.dtype is torch.float32
            and (b1 is None or b1.dtype is torch.float32) and not torch.is_autocast_enabled("cpu")
            and linear_op.CPU_GEMM == "onednn" and _own_gemm(w1, w2))


def own_gemm_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                 b2: Optional[torch.Tensor], approximate: str) -> Optional[torch.Tensor]:
    """``gelu(x W1^T + b1) W2^T + b2`` with the GELU (and in the backward its derivative and b1's gradient) in the
    epilogues of vitkernels' own GEMM, where the layers' Linears run it: ``vitkernels::gelu_mlp_eager`` in eager
    mode (:func:`eager_takes_it`), ``vitkernels::gelu_mlp_own`` under torch.compile (:func:`compiled_takes_it`);
    None elsewhere (the caller runs its unfused sequence). The layers ask it without argument checks of their own:
    the operands are a Linear pair's."""
    if eager_takes_it(x, w1, b1, w2):
        return torch.ops.vitkernels.gelu_mlp_eager(x, w1, b1, w2, b2, approximate)
    if compiled_takes_it(x, w1, b1, w2):
        keep_pre = needs_grad(x, w1, b1, w2, b2)
        return torch.ops.vitkernels.gelu_mlp_own(x, w1, b1, w2, b2, approximate, keep_pre)[0]
    return None


_OWN_OP_BUILT = _native.is_loaded() and hasattr(torch.ops.vitkernels, "gelu_mlp_own")


def native_preferred(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether ``auto`` would run the native op on these operands (a layer's fast path asks before calling it; a
    question, not a dispatch: nothing is selected)."""
    return op.auto_choice(_call(x, w1, w2))[0] == "native"


if _native.is_loaded():
    _forward = torch.ops.vitkernels.gelu_mlp.default

    @torch.library.register_fake("vitkernels::gelu_mlp")
    def _gelu_mlp_fake(x, w1, b1, w2, b2, approximate, block_rows=0, own_gemm=False):
        return x.new_empty((*x.shape[:-1], w2.shape[0]))

    @torch.library.register_fake("vitkernels::gelu_mlp_train")
    def _gelu_mlp_train_fake(x, w1, b1, w2, b2, approximate, block_rows=0, own_gemm=False):
        return x.new_empty((*x.shape[:-1], w2.shape[0])), x.new_empty((math.prod(x.shape[:-1]), w1.shape[0]))

    @torch.library.register_fake("vitkernels::gelu_mlp_backward")
    def _gelu_mlp_backward_fake(grad, x, pre, w1, b1, w2, approximate, block_rows=0, own_gemm=False):
        return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[:1]), w2.new_empty(w2.shape),
                w2.new_empty(w2.shape[:1]))

    def _rows(t: torch.Tensor) -> torch.Tensor:
        """(..., K) as (rows, K), K = 0 included (where reshape(-1, K) is ambiguous)."""
        return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])

    def _recomputing_backward(grad, x, w1, b1, w2, has_b2, approximate, need):
        """The gradients from the hidden pre-activation recomputed with differentiable ATen ops: gelu_mlp's own
        backward (its forward stores nothing), and gelu_mlp_train's under ``create_graph`` (double backward)."""
        pre = F.linear(x, w1, b1)
        hidden = F.gelu(pre, approximate=approximate)
        g2 = _rows(grad)
        grad_pre = torch.ops.aten.gelu_backward(grad @ w2, pre, approximate=approximate)
        gp2 = _rows(grad_pre)
        return (
            grad_pre @ w1 if need[0] else None,
            gp2.t() @ _rows(x) if need[1] else None,
            gp2.sum(0) if b1 is not None and need[2] else None,
            g2.t() @ _rows(hidden) if need[3] else None,
            g2.sum(0) if has_b2 and need[4] else None,
            None,
            None,
            None,
        )

    def _setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, ctx.approximate, _, _ = inputs
        ctx.has_b2 = b2 is not None
        ctx.save_for_backward(x, w1, b1, w2)

    def _backward(ctx, grad):
        x, w1, b1, w2 = ctx.saved_tensors
        return _recomputing_backward(grad, x, w1, b1, w2, ctx.has_b2, ctx.approximate, ctx.needs_input_grad)

    torch.library.register_autograd(_forward, _backward, setup_context=_setup_context)

    def _train_setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, ctx.approximate, ctx.block_rows, ctx.own_gemm = inputs
        ctx.has_b2 = b2 is not None
        _, pre = output
        ctx.save_for_backward(x, pre, w1, b1, w2)
        ctx.mark_non_differentiable(pre)  # the backward's input, not a result
        ctx.set_materialize_grads(False)

    def _train_backward(ctx, grad, _grad_pre):
        if grad is None:  # the output was not used
            return (None,) * 8
        x, pre, w1, b1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: a formula autograd can differentiate again
            return _recomputing_backward(grad, x, w1, b1, w2, ctx.has_b2, ctx.approximate, need)
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = torch.ops.vitkernels.gelu_mlp_backward(
            grad, x, pre, w1, b1, w2, ctx.approximate, ctx.block_rows, ctx.own_gemm)
        return (grad_x if need[0] else None, grad_w1 if need[1] else None,
                grad_b1 if b1 is not None and need[2] else None, grad_w2 if need[3] else None,
                grad_b2 if ctx.has_b2 and need[4] else None, None, None, None)

    torch.library.register_autograd(torch.ops.vitkernels.gelu_mlp_train.default, _train_backward,
                                    setup_context=_train_setup_context)
    # create_graph takes the recomputing formula above; the C++ backward itself is never differentiated
    refuse_double_backward(torch.ops.vitkernels.gelu_mlp_backward.default, "gelu_mlp", "native")

    def _native_reason(call: dispatch.Call) -> Optional[str]:
        reason = _native.native_unavailable_reason("gelu_mlp", call.device)
        if reason is None and call.dtype not in NATIVE_DTYPES:
            reason = f"dtype {call.dtype} (the native op takes {', '.join(map(str, NATIVE_DTYPES))})"
        return reason

    @op.register("native", _native_reason, auto_checks=(auto_prefers_native,))
    def _gelu_mlp_native(x, w1, b1, w2, b2, approximate, block_rows):
        if needs_grad(x, w1, b1, w2, b2):
            # training: the forward keeps fc1's output for the backward, which runs block by block too
            y, _ = torch.ops.vitkernels.gelu_mlp_train(x, w1, b1, w2, b2, approximate, block_rows, _own_gemm(w1, w2))
            return y
        return _forward(x, w1, b1, w2, b2, approximate, block_rows, _own_gemm(w1, w2))

    def _own_gemm(w1: torch.Tensor, w2: torch.Tensor) -> bool:
        """The blocks' GEMMs (and gelu_mlp_eager's, eager_takes_it) through vitkernels' own where the layers'
        Linears of these sizes take it (linear_op.runs_own_gemm for fc1 and fc2)."""
        (H, C), (N, _) = w1.shape, w2.shape
        return linear_op.runs_own_gemm(C, H) and linear_op.runs_own_gemm(H, N)

    run_native = _gelu_mlp_native  # for layers that asked native_preferred() first: no argument checks again

else:
    op.mark_missing("native", _native.IMPORT_ERROR)

if _OWN_OP_BUILT:
    # vitkernels::gelu_mlp_own (csrc/cpu/gelu_mlp.cpp): gelu_mlp_eager's forward as an op with its tensors out, for
    # torch.compile's graphs -> (y, h = gelu(pre) (M, H), pre = x W1^T + b1 (M, H) or empty without keep_pre). Its
    # backward: W2's and W1's gradients and x's through vitkernels::cpu_gemm, the hidden gradient through the GELU
    # (and b1's gradient) in the epilogue of the GEMM grad W2 (vitkernels::gelu_mlp_own_grad_pre).
    @torch.library.register_fake("vitkernels::gelu_mlp_own")
    def _gelu_mlp_own_fake(x, w1, b1, w2, b2, approximate, keep_pre):
        rows, hidden = math.prod(x.shape[:-1]), w1.shape[0]
        return (x.new_empty((*x.shape[:-1], w2.shape[0])), x.new_empty((rows, hidden)),
                x.new_empty((rows, hidden) if keep_pre else (0,)))

    @torch.library.register_fake("vitkernels::gelu_mlp_own_grad_pre")
    def _gelu_mlp_own_grad_pre_fake(grad, w2, pre, approximate):
        return pre.new_empty(pre.shape), pre.new_empty(pre.shape[1:])

    def _own_setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, ctx.approximate, ctx.keep_pre = inputs
        ctx.has_b2 = b2 is not None
        _, h, pre = output
        ctx.save_for_backward(x, w1, b1, w2, h, pre)
        ctx.mark_non_differentiable(h, pre)  # the backward's inputs, not results
        ctx.set_materialize_grads(False)

    def _own_backward(ctx, grad, _grad_h, _grad_pre):
        if grad is None:  # the output was not used
            return (None,) * 7
        if not ctx.keep_pre:
            raise RuntimeError("gelu_mlp_own: the forward ran with keep_pre=False (no gradient was required), so it "
                               "cannot be differentiated")
        x, w1, b1, w2, h, pre = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: a formula autograd can differentiate again
            return _recomputing_backward(grad, x, w1, b1, w2, ctx.has_b2, ctx.approximate, need)[:5] + (None, None)
        gemm = torch.ops.vitkernels.cpu_gemm
        g2 = grad.reshape(pre.shape[0], w2.shape[0])
        grad_x = grad_w1 = grad_b1 = None
        if need[0] or need[1] or (b1 is not None and need[2]):
            grad_pre, grad_b1 = torch.ops.vitkernels.gelu_mlp_own_grad_pre(g2, w2, pre, ctx.approximate)
            grad_x = gemm(grad_pre, w1).view(x.shape) if need[0] else None
            grad_w1 = gemm(grad_pre.t(), _rows(x)) if need[1] else None
        return (grad_x, grad_w1, grad_b1 if b1 is not None and need[2] else None,
                gemm(g2.t(), h) if need[3] else None, g2.sum(0) if ctx.has_b2 and need[4] else None, None, None)

    torch.library.register_autograd(torch.ops.vitkernels.gelu_mlp_own.default, _own_backward,
                                    setup_context=_own_setup_context)
    # create_graph takes the recomputing formula above; the GELU-backward GEMM itself is never differentiated
    refuse_double_backward(torch.ops.vitkernels.gelu_mlp_own_grad_pre.default, "gelu_mlp_own", "native")
