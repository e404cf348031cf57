"""Op: the DINO multi-crop loss and its centre EMA update.

Public functions :func:`dino_loss` and :func:`dino_center_update` validate their arguments and dispatch to

* ``reference`` -- :mod:`vitkernels.reference.dino_loss` (the official ``DINOLoss`` arithmetic: one
  ``log_softmax`` and one product per (teacher view, student view) pair),
* ``triton``    -- ``torch.ops.vitkernels.triton_dino_loss`` (+ ``_backward``) and
  ``torch.ops.vitkernels.triton_dino_center_update``: the kernels of :mod:`vitkernels.triton.dino_loss` (each
  student row's log-sum-exp and the teacher softmax computed once, the pair sum collapsed to per-row dot products,
  the student gradient in one more pass; the centre update one fused column reduction + EMA), registered with fake
  implementations and autograd so ``torch.compile(fullgraph=True)`` sees no graph break,
* ``native``    -- no C++ implementation (not planned: the loss is bandwidth-bound GPU work).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vitkernels import dispatch
from vitkernels._validation import (
    FLOAT_DTYPES,
    check_int,
    check_positive_float,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from vitkernels.reference import dino_loss as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

loss_op = dispatch.op(
    "dino_loss", "DINO multi-crop soft cross-entropy, teacher centred + sharpened, same-view pairs skipped"
)
center_op = dispatch.op("dino_center_update", "DINO centre EMA: m * center + (1 - m) * mean(teacher_output, 0)")

HALF_DTYPES = (torch.float16, torch.bfloat16)


# --- public API ---------------------------------------------------------------------------------------------------

def dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    ncrops: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """DINO loss (Caron et al. 2021, official ``DINOLoss.forward`` without the centre update).

    Args:
        student_output: (ncrops * B, K) student logits, view-major (row ``v * B + b``: view v of image b; the 2 global
            views first).
        teacher_output: (2 * B, K) teacher logits of the 2 global views, same dtype as ``student_output``. No
            gradient flows into it (the official code detaches the teacher).
        center: (K,) or (1, K), any float dtype (the official buffer is float32 also under AMP).
        ncrops: number of student views, >= 1.
        student_temp, teacher_temp: softmax temperatures, > 0.
        backend: ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``; see :mod:`vitkernels.dispatch`.

    Returns:
        Scalar loss ``1/n_pairs * sum_{t<2, v!=t} mean_b sum_k -q_t log_softmax(s_v / student_temp)`` with
        ``q_t = softmax((teacher_t - center) / teacher_temp)``. Float32 for float16 / bfloat16 inputs (computed in
        float32, as the official code's softmax / log_softmax under autocast), else the input dtype.
    """
    details = _check_loss_args(student_output, teacher_output, center, ncrops, student_temp, teacher_temp)
    impl = loss_op.select(dispatch.Call(student_output.device, student_output.dtype, details), backend)
    return impl(student_output, teacher_output, center.reshape(-1), ncrops, float(student_temp), float(teacher_temp))


def dino_center_update(
    center: torch.Tensor, teacher_output: torch.Tensor, momentum: float = 0.9, *, backend: Optional[str] = None
) -> torch.Tensor:
    """The centre's EMA step after the loss (official ``DINOLoss.update_center``), without modifying the inputs.

    Args:
        center: (K,) or (1, K), any float dtype.
        teacher_output: (R, K) teacher logits (R = 2 * B in DINO), any float dtype.
        momentum: EMA momentum in [0, 1] (official 0.9).
        backend: see :func:`dino_loss`.

    Returns:
        ``momentum * center + (1 - momentum) * sum_r teacher_output[r] / (R * world_size)``, the row sum all-reduced
        over ranks when ``torch.distributed`` is initialised; shape of ``center``, dtype ``promote(center,
        teacher_output)``. No gradient.
    """
    check_tensor("teacher_output", teacher_output, ndim=2)
    check_tensor("center", center, ndim=(1, 2))
    _check_center(center, teacher_output.shape[1])
    if teacher_output.shape[0] == 0:
        raise ValueError(f"teacher_output must have at least one row, got shape {tuple(teacher_output.shape)}")
    momentum = _check_momentum(momentum)
    check_same_device(center=center, teacher_output=teacher_output)
    call = dispatch.Call(teacher_output.device, teacher_output.dtype, {"center_dtype": center.dtype})
    impl = center_op.select(call, backend)
    with torch.no_grad():
        return impl(center, teacher_output, momentum)


# --- argument checks ----------------------------------------------------------------------------------------------

def _check_center(center: torch.Tensor, K: int) -> None:
    if center.dim() == 2 and center.shape[0] != 1:
        raise ValueError(f"center must have shape (K,) or (1, K), got {tuple(center.shape)}")
    if center.shape[-1] != K:
        raise ValueError(
            f"center must have K = {K} entries (the logits' last dimension), got shape {tuple(center.shape)}"
        )


def _check_momentum(momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return float(momentum)


def _check_loss_args(student, teacher, center, ncrops, student_temp, teacher_temp) -> dict:
    check_tensor("student_output", student, ndim=2)
    check_tensor("teacher_output", teacher, ndim=2)
    check_tensor("center", center, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    check_int("ncrops", ncrops, minimum=1)
    check_positive_float("student_temp", student_temp)
    check_positive_float("teacher_temp", teacher_temp)
    rows, K = student.shape
    if K == 0:
        raise ValueError(f"student_output must have K >= 1 classes, got shape {tuple(student.shape)}")
    if rows == 0 or rows % ncrops != 0:
        raise ValueError(
            f"student_output must have ncrops * B rows (ncrops={ncrops}, B >= 1), got shape {tuple(student.shape)}"
        )
    B = rows // ncrops
    if teacher.shape != (2 * B, K):
        raise ValueError(
            f"teacher_output must have shape (2 * B, K) = ({2 * B}, {K}) for student_output of shape "
            f"{tuple(student.shape)} with ncrops={ncrops}, got {tuple(teacher.shape)}"
        )
    _check_center(center, K)
    check_same_dtype(student_output=student, teacher_output=teacher)
    check_same_device(student_output=student, teacher_output=teacher, center=center)
    return {"batch": B, "classes": K, "ncrops": ncrops}


# --- reference backend --------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs (the official softmax / log_softmax run in float32 under autocast)."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


@loss_op.register("reference")
def _loss_reference(student, teacher, center, ncrops, student_temp, teacher_temp):
    dtype = _compute_dtype(student.dtype)
    return reference.dino_loss(
        student.to(dtype), teacher.to(dtype), center.to(dtype), ncrops, student_temp, teacher_temp
    ).to(dtype)


@center_op.register("reference")
def _center_reference(center, teacher, momentum):
    return reference.dino_center_update(center, teacher, momentum)


loss_op.mark_missing("native", "no C++ implementation of dino_loss (the fused loss is a Triton kernel)")
center_op.mark_missing("native", "no C++ implementation of dino_center_update (the fused loss is a Triton kernel)")


# --- triton backend: vitkernels/triton/dino_loss.py ---------------------------------------------------------------

def _loss_fake(student, teacher, center, ncrops, student_temp, teacher_temp):
    f32 = dict(dtype=torch.float32)
    return (student.new_empty((), **f32), student.new_empty((student.shape[0],), **f32),
            teacher.new_empty((teacher.shape[0],), **f32), center.new_empty((center.shape[0],), **f32))


def _loss_backward_fake(grad, student, teacher, center, student_lse, teacher_lse, ncrops, student_temp, teacher_temp):
    return torch.empty_like(student)


def _center_fake(center, teacher, momentum):
    return center.new_empty(center.shape, dtype=torch.promote_types(center.dtype, teacher.dtype))


def _register_fake_and_autograd(forward, backward, center_update) -> None:
    """Fakes for the three ops; autograd of ``forward`` (loss, student log-sum-exps, teacher log-sum-exps, centre
    copy) through ``backward``: only the student gets a gradient (the official code detaches the teacher; the
    centre is a buffer), and the other outputs are saved statistics, not differentiable. The backward uses the
    forward's copy of the centre, so that updating the centre in place after the loss (as the modules do) is safe."""

    def setup_context(ctx, inputs, output):
        student, teacher, _, ctx.ncrops, ctx.student_temp, ctx.teacher_temp = inputs
        _, student_lse, teacher_lse, center_copy = output
        ctx.save_for_backward(student, teacher, center_copy, student_lse, teacher_lse)
        ctx.mark_non_differentiable(student_lse, teacher_lse, center_copy)

    def backward_fn(ctx, grad_loss, *_grads_of_statistics):
        grad_student = None
        if ctx.needs_input_grad[0]:
            student, teacher, center, student_lse, teacher_lse = ctx.saved_tensors
            grad_student = backward(grad_loss, student, teacher, center, student_lse, teacher_lse, ctx.ncrops,
                                    ctx.student_temp, ctx.teacher_temp)
        return grad_student, None, None, None, None, None

    torch.library.register_fake(forward)(_loss_fake)
    torch.library.register_fake(backward)(_loss_backward_fake)
    torch.library.register_fake(center_update)(_center_fake)
    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)
    refuse_double_backward(backward, "dino_loss", "triton")


if HAS_TRITON:
    from vitkernels.ops._library import kernel_op, refuse_double_backward
    from vitkernels.triton import dino_loss as triton_kernels

    @kernel_op("vitkernels::triton_dino_loss")
    def triton_dino_loss(
        student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int, student_temp: float,
        teacher_temp: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_kernels.dino_loss_fwd(student, teacher, center, ncrops, student_temp, teacher_temp)

    @kernel_op("vitkernels::triton_dino_loss_backward")
    def triton_dino_loss_backward(
        grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
        student_lse: torch.Tensor, teacher_lse: torch.Tensor, ncrops: int, student_temp: float, teacher_temp: float,
    ) -> torch.Tensor:
        return triton_kernels.dino_loss_bwd(grad, student, teacher, center, student_lse, teacher_lse, ncrops,
                                            student_temp, teacher_temp)

    @kernel_op("vitkernels::triton_dino_center_update")
    def triton_dino_center_update(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
        return triton_kernels.dino_center_update(center, teacher, momentum)

    _register_fake_and_autograd(triton_dino_loss, triton_dino_loss_backward, triton_dino_center_update)

    _TRITON_DTYPES = dispatch.dtypes_check(torch.float16, torch.bfloat16, torch.float32)

    @loss_op.register("triton", lambda call: triton_unavailable_reason(call.device), _TRITON_DTYPES)
    def _loss_triton(student, teacher, center, ncrops, student_temp, teacher_temp):
        loss, _, _, _ = triton_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp)
        return loss

    def _single_process(call: dispatch.Call) -> Optional[str]:
        if reference.world_size() > 1:
            return ("torch.distributed has more than one process: the column sums must be all-reduced between the "
                    "reduction and the EMA, which the one-pass Triton kernel fuses (the reference does the all-reduce)")
        return None

    @center_op.register("triton", lambda call: triton_unavailable_reason(call.device), _TRITON_DTYPES,
                        _single_process)
    def _center_triton(center, teacher, momentum):
        return triton_dino_center_update(center, teacher, momentum)

else:
    loss_op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))
    center_op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))
