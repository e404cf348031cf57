"""Op: token masking for MAE and MSN (random masking, decoder unshuffle, MSN patch drop) and MAE's patchify.

Public functions validate their arguments and dispatch to

* ``reference`` -- :mod:`vitkernels.reference.masking` (the official argsort + gather + repeat + cat steps),
* ``triton``    -- custom ops ``torch.ops.vitkernels.triton_random_masking`` / ``triton_gather_rows`` /
  ``triton_mae_unshuffle`` / ``triton_mae_unshuffle_backward`` launching the kernels of
  :mod:`vitkernels.triton.masking` (rank by comparison instead of two argsorts, gathers with the pos-embed add fused,
  the decoder input built in one pass),
* ``native``    -- the same four ops without the ``triton_`` prefix from ``csrc/cpu/masking.cpp`` and
  ``csrc/cuda/masking.cpp`` (a stable sort, then the same row gathers / scatters in C++ / CUDA).

Both op sets get the same fake implementations and autograd (:func:`_register_fakes_and_autograd`: each gather's
backward is the gather by the inverse index; the unshuffle and its backward are each other's adjoint), so
``torch.compile(fullgraph=True)`` traces them.

Random draws (MAE noise, MSN permutation) happen here, before dispatch, with the official code's calls
(``torch.rand(N, L, device=x.device)``, ``torch.randperm(L)``), so every backend sees the same randomness and a seed
gives the same masks as the official code.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

from vitkernels import _native, dispatch
from vitkernels._validation import (
    INDEX_DTYPES,
    check_int,
    check_ratio,
    check_same_device,
    check_shape,
    check_tensor,
)
from vitkernels.reference import masking as reference
from vitkernels.triton import HAS_TRITON, triton_unavailable_reason

random_masking_op = dispatch.op(
    "random_masking", "MAE per-sample random masking: rank noise, gather kept tokens (+ pos-embed), binary mask"
)
mae_unshuffle_op = dispatch.op(
    "mae_unshuffle", "MAE decoder input: mask tokens + unshuffle by ids_restore, CLS in front, + decoder pos-embed"
)
msn_patch_drop_op = dispatch.op("msn_patch_drop", "MSN patch drop: keep a batch-shared random subset, CLS in front")

# The Triton ranking compares every patch's noise with its whole row: O(L^2) per sample, fine for ViT token counts
# (196 for ViT-L/16 at 224, 1024 at 512) but not for very long sequences, where torch.sort (reference) is better.
TRITON_MAX_TOKENS = 8192


# --- public API ---------------------------------------------------------------------------------------------------

def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    noise: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE random masking (optionally adding the patch positional embedding in the same pass).

    Args:
        x: (N, L, D) patch tokens (no CLS), float.
        mask_ratio: fraction of patches removed, in [0, 1); ``len_keep = int(L * (1 - mask_ratio))``.
        noise: optional (N, L) float noise on ``x``'s device; ``torch.rand(N, L, device=x.device)`` when None.
        pos_embed: optional (1, L, D) or (N, L, D), added to ``x`` before the gather (pass the official encoder's
            ``pos_embed[:, 1:, :]``). Its dtype may differ from ``x``'s (an fp32 table under autocast): the tokens
            then come out in the promoted dtype, as the official ``x + pos_embed``.
        backend: ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``.

    Returns:
        ``(x_masked (N, len_keep, D), mask (N, L) (1 = removed), ids_restore (N, L) int64)``, as
        :func:`vitkernels.reference.masking.random_masking` (stable tie-break by patch index); ``x_masked`` in
        ``x``'s dtype (promoted with ``pos_embed``'s), ``mask`` in the default dtype (the official
        ``torch.ones([N, L])``).
    """
    check_tensor("x", x, ndim=3)
    ratio = check_ratio("mask_ratio", mask_ratio)
    N, L, D = x.shape
    if L == 0:
        raise ValueError(f"x must have at least one token, got shape {tuple(x.shape)}")
    if noise is not None:
        check_tensor("noise", noise, ndim=2)
        check_shape("noise", noise, (N, L), "(N, L) of x")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        _check_pos_embed("pos_embed", pos_embed, N, L, D)
    check_same_device(x=x, noise=noise, pos_embed=pos_embed)
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    len_keep = reference.num_kept(L, ratio)
    impl = random_masking_op.select(dispatch.Call(x.device, x.dtype, {"num_tokens": L}), backend)
    x_masked, mask, ids_restore = impl(x, noise, len_keep, pos_embed)
    # the official mask is torch.ones([N, L]): the default dtype whatever x's (0 / 1 convert exactly)
    return x_masked, mask.to(torch.get_default_dtype()), ids_restore


def mae_unshuffle(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """MAE decoder input: visible tokens + mask tokens in the original patch order, CLS in front, + pos-embed.

    Args:
        x: (N, 1 + len_keep, D) decoder-embedded encoder output, CLS first.
        ids_restore: (N, L) int64 (or int32) from :func:`random_masking`, ``L >= len_keep``. It must be a
            permutation of ``range(L)`` per row (as :func:`random_masking` returns). CPU tensors are checked: here
            in eager mode (ValueError), and by the native op itself (RuntimeError, also under torch.compile and for
            direct ``torch.ops`` calls). GPU tensors are not (that would synchronise): the kernels treat a rank
            outside ``[0, L)`` as a masked position and never read or write out of bounds, but a repeated rank
            gives wrong numbers there.
        mask_token: (1, 1, D) or (D,).
        pos_embed: optional (1, 1 + L, D) or (N, 1 + L, D) decoder positional embedding.
        Dtypes may differ (a bf16 ``x`` under autocast with fp32 parameters): the result is in the promoted dtype,
        as the official ``torch.cat`` and ``+`` give.
        backend: see :func:`random_masking`.

    Returns:
        (N, 1 + L, D), as :func:`vitkernels.reference.masking.mae_unshuffle`.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor("mask_token", mask_token, ndim=(1, 3))
    N, keep_plus_cls, D = x.shape
    if keep_plus_cls == 0:
        raise ValueError(f"x must hold the CLS token first, got shape {tuple(x.shape)}")
    if ids_restore.shape[0] != N:
        raise ValueError(f"ids_restore must have shape (N={N}, L), got {tuple(ids_restore.shape)}")
    L = ids_restore.shape[1]
    if L < keep_plus_cls - 1:
        raise ValueError(
            f"ids_restore has L={L} patches but x holds {keep_plus_cls - 1} visible tokens after CLS: L must be >= that"
        )
    check_shape("mask_token", mask_token, (1, 1, D) if mask_token.dim() == 3 else (D,), "D of x")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        _check_pos_embed("pos_embed", pos_embed, N, L + 1, D)
    check_same_device(x=x, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
    if ids_restore.device.type == "cpu" and not torch.compiler.is_compiling():
        rows = torch.arange(L, dtype=ids_restore.dtype).expand(N, L)
        if not torch.equal(torch.sort(ids_restore, dim=1).values, rows):
            raise ValueError("ids_restore must be a permutation of range(L) in every row")
    impl = mae_unshuffle_op.select(dispatch.Call(x.device, x.dtype), backend)
    return impl(x, ids_restore, mask_token.reshape(D), pos_embed)


def msn_patch_drop(
    x: torch.Tensor,
    drop_ratio: float,
    perm: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MSN patch drop: keep ``floor(L * (1 - drop_ratio))`` patches chosen by one permutation for the whole batch.

    Args:
        x: (B, 1 + L, D) tokens, CLS first.
        drop_ratio: fraction of patches dropped, in [0, 1).
        perm: optional (L,) int64 (or int32) permutation of ``range(L)`` on ``x``'s device; ``torch.randperm(L)``
            (CPU generator, as the official code) when None. A CPU ``perm`` is checked to be a permutation (in eager
            mode here; compiled, the native gather refuses a repeated index); one on a GPU is not (that would
            synchronise), the kernels never read out of bounds.
        backend: see :func:`random_masking`.

    Returns:
        ``(kept (B, 1 + keep, D), idx (1 + keep,) int64)`` with ``idx[0] = 0`` (CLS) and ``kept = x[:, idx]``.
        With ``drop_ratio == 0`` and no ``perm``, nothing moves (``idx = arange(1 + L)``), as the official code.
    """
    check_tensor("x", x, ndim=3)
    ratio = check_ratio("drop_ratio", drop_ratio)
    if x.shape[1] == 0:
        raise ValueError(f"x must hold the CLS token first, got shape {tuple(x.shape)}")
    L = x.shape[1] - 1
    if perm is not None:
        check_tensor("perm", perm, ndim=1, dtypes=INDEX_DTYPES)
        check_shape("perm", perm, (L,), "L = x.shape[1] - 1 patches")
        check_same_device(x=x, perm=perm)
        if perm.device.type == "cpu" and not torch.compiler.is_compiling():
            if not torch.equal(torch.sort(perm).values, torch.arange(L, dtype=perm.dtype)):
                raise ValueError("perm must be a permutation of range(L)")
    keep = reference.num_kept(L, ratio)
    if perm is None:
        perm = torch.arange(L) if ratio == 0 else torch.randperm(L)
    # CLS (index 0) first, then the first ``keep`` permuted patches, shifted past CLS.
    idx = torch.cat([perm.new_zeros(1, dtype=torch.int64), 1 + perm[:keep].long()]).to(x.device)
    impl = msn_patch_drop_op.select(dispatch.Call(x.device, x.dtype), backend)
    return impl(x, idx), idx


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, (H/p) * (W/p), p * p * C) in the official MAE (row, column, channel) patch order.

    A layout copy PyTorch already does at memory bandwidth, so it has no backends; :func:`mae_loss` fuses it into
    its kernel instead. Non-square images are allowed (the official code asserts ``H == W``).
    """
    check_tensor("imgs", imgs, ndim=4)
    p = check_int("patch_size", patch_size, minimum=1)
    _check_divisible(imgs, p)
    return reference.patchify(imgs, p)


def unpatchify(
    x: torch.Tensor, patch_size: int, grid_size: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """(N, h * w, p * p * C) -> (N, C, h * p, w * p), the inverse of :func:`patchify`.

    ``grid_size = (h, w)``; by default square (``h = w = sqrt(L)``, which must then be an integer).
    """
    check_tensor("x", x, ndim=3)
    p = check_int("patch_size", patch_size, minimum=1)
    N, L, PPC = x.shape
    if PPC % (p * p) != 0:
        raise ValueError(f"x.shape[2] must be a multiple of patch_size**2 = {p * p}, got shape {tuple(x.shape)}")
    if grid_size is None:
        h = int(round(L ** 0.5))
        if h * h != L:
            raise ValueError(f"x has L={L} patches, not a square grid: pass grid_size=(h, w)")
        grid = (h, h)
    else:
        if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2:
            raise TypeError(f"grid_size must be a pair (h, w), got {grid_size!r}")
        grid = (check_int("grid_size[0]", grid_size[0], minimum=1), check_int("grid_size[1]", grid_size[1], minimum=1))
        if grid[0] * grid[1] != L:
            raise ValueError(f"grid_size {grid} has {grid[0] * grid[1]} patches but x has L={L}")
    return reference.unpatchify(x, p, grid)


# --- shared checks ------------------------------------------------------------------------------------------------

def _check_pos_embed(name: str, pos_embed: torch.Tensor, N: int, rows: int, D: int) -> None:
    if pos_embed.shape[0] not in (1, N) or tuple(pos_embed.shape[1:]) != (rows, D):
        raise ValueError(f"{name} must have shape (1, {rows}, {D}) or ({N}, {rows}, {D}), got {tuple(pos_embed.shape)}")


def _check_divisible(imgs: torch.Tensor, p: int) -> None:
    H, W = imgs.shape[2], imgs.shape[3]
    if H % p != 0 or W % p != 0 or H == 0 or W == 0:
        raise ValueError(
            f"imgs height and width must be positive multiples of patch_size={p}, got shape {tuple(imgs.shape)}"
        )


# --- reference backend --------------------------------------------------------------------------------------------

@random_masking_op.register("reference")
def _random_masking_reference(x, noise, len_keep, pos_embed):
    return reference.mask_by_noise(x, noise, len_keep, pos_embed)


@mae_unshuffle_op.register("reference")
def _mae_unshuffle_reference(x, ids_restore, mask_token, pos_embed):
    return reference.mae_unshuffle(x, ids_restore.long(), mask_token, pos_embed)


@msn_patch_drop_op.register("reference")
def _msn_patch_drop_reference(x, idx):
    return x[:, idx, :]


# --- fake implementations and autograd, shared by the triton and native op sets ----------------------------------

class MaskingOps(NamedTuple):
    """One backend's four custom ops (same schemas): ``gather_rows(src, idx, inverse_idx, add, out_dtype)``,
    ``random_masking(x, noise, len_keep, pos_embed) -> (x_masked, mask, ids_restore, ids_keep)``,
    ``mae_unshuffle(x, ids_restore, mask_token, pos_embed)`` and
    ``mae_unshuffle_backward(grad, ids_restore, keep, x_dtype, token_dtype) -> (grad_x, grad_mask_token)``."""

    gather_rows: Callable
    random_masking: Callable
    mae_unshuffle: Callable
    mae_unshuffle_backward: Callable


def _embed_grad(grad_rows: torch.Tensor, embed_batch: int) -> torch.Tensor:
    """Gradient of an embedding added per row: summed over the batch where it was broadcast from batch 1."""
    if embed_batch == 1 and grad_rows.shape[0] != 1:
        return grad_rows.sum(0, keepdim=True)
    return grad_rows


def _gather_out_dtype(src, add, out_dtype):
    if out_dtype is not None:
        return out_dtype
    return src.dtype if add is None else torch.promote_types(src.dtype, add.dtype)


def _unshuffle_dtype(x, mask_token, pos_embed):
    dtype = torch.promote_types(x.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


def _register_fakes_and_autograd(ops: MaskingOps) -> None:
    def gather_fake(src, idx, inverse_idx, add, out_dtype):
        dtype = _gather_out_dtype(src, add, out_dtype)
        return src.new_empty((src.shape[0], idx.shape[-1], src.shape[2]), dtype=dtype)

    def gather_backward_rows(grad, idx, inverse_idx, src_dtype, add_dtype, add_batch, needs_src, needs_add):
        """(grad_src, grad_add) of a row gather: the gather of ``grad`` by the inverse index."""
        grad = grad.contiguous()
        if not needs_add:
            grad_src = ops.gather_rows(grad, inverse_idx, idx, None, src_dtype) if needs_src else None
            return grad_src, None
        grad_rows = ops.gather_rows(grad, inverse_idx, idx, None, None)
        grad_src = grad_rows.to(src_dtype) if needs_src else None
        return grad_src, _embed_grad(grad_rows, add_batch).to(add_dtype)

    def gather_setup(ctx, inputs, output):
        src, idx, inverse_idx, add, _ = inputs
        ctx.save_for_backward(idx, inverse_idx)
        ctx.src_dtype = src.dtype
        ctx.add_dtype = None if add is None else add.dtype
        ctx.add_batch = None if add is None else add.shape[0]

    def gather_backward(ctx, grad):
        idx, inverse_idx = ctx.saved_tensors
        needs_src, _, _, needs_add, _ = ctx.needs_input_grad
        grad_src, grad_add = gather_backward_rows(
            grad, idx, inverse_idx, ctx.src_dtype, ctx.add_dtype, ctx.add_batch, needs_src, needs_add
        )
        return grad_src, None, None, grad_add, None

    def random_masking_fake(x, noise, len_keep, pos_embed):
        N, L, D = x.shape
        dtype = _gather_out_dtype(x, pos_embed, None)
        ids = x.new_empty((N, L), dtype=torch.int64)
        keep_ids = x.new_empty((N, len_keep), dtype=torch.int64)
        return x.new_empty((N, len_keep, D), dtype=dtype), x.new_empty((N, L), dtype=dtype), ids, keep_ids

    def random_masking_setup(ctx, inputs, output):
        x, _, _, pos_embed = inputs
        _, mask, ids_restore, ids_keep = output
        ctx.mark_non_differentiable(mask, ids_restore, ids_keep)
        ctx.save_for_backward(ids_restore, ids_keep)
        ctx.x_dtype = x.dtype
        ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype
        ctx.pos_batch = None if pos_embed is None else pos_embed.shape[0]

    def random_masking_backward(ctx, grad, _grad_mask, _grad_ids_restore, _grad_ids_keep):
        ids_restore, ids_keep = ctx.saved_tensors
        needs_x, _, _, needs_pos = ctx.needs_input_grad
        # the adjoint of gathering by ids_keep is gathering by its inverse, ids_restore (ranks >= len_keep -> 0)
        grad_x, grad_pos = gather_backward_rows(
            grad, ids_keep, ids_restore, ctx.x_dtype, ctx.pos_dtype, ctx.pos_batch, needs_x, needs_pos
        )
        return grad_x, None, None, grad_pos

    def unshuffle_fake(x, ids_restore, mask_token, pos_embed):
        dtype = _unshuffle_dtype(x, mask_token, pos_embed)
        return x.new_empty((x.shape[0], ids_restore.shape[1] + 1, x.shape[2]), dtype=dtype)

    def unshuffle_backward_fake(grad, ids_restore, keep, x_dtype, token_dtype):
        N, _, D = grad.shape
        return grad.new_empty((N, keep + 1, D), dtype=x_dtype), grad.new_empty((D,), dtype=token_dtype)

    def unshuffle_setup(ctx, inputs, output):
        x, ids_restore, mask_token, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.keep = x.shape[1] - 1
        ctx.dtypes = (x.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)
        ctx.pos_batch = None if pos_embed is None else pos_embed.shape[0]

    def unshuffle_backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        x_dtype, token_dtype, pos_dtype = ctx.dtypes
        grad_x, grad_token = ops.mae_unshuffle_backward(grad.contiguous(), ids_restore, ctx.keep, x_dtype, token_dtype)
        grad_pos = None
        if ctx.needs_input_grad[3]:
            grad_pos = _embed_grad(grad, ctx.pos_batch).to(pos_dtype)
        return grad_x, None, grad_token, grad_pos

    def unshuffle_backward_setup(ctx, inputs, output):
        grad, ids_restore, keep, x_dtype, token_dtype = inputs
        ctx.save_for_backward(ids_restore)
        ctx.grad_dtype = grad.dtype
        ctx.x_shape = (grad.shape[0], keep + 1, grad.shape[2])
        ctx.dtypes = (x_dtype, token_dtype)

    def unshuffle_backward_backward(ctx, grad_grad_x, grad_grad_token):
        # the unshuffle is linear in (x, mask_token): the adjoint of its backward is the unshuffle itself
        (ids_restore,) = ctx.saved_tensors
        x_dtype, token_dtype = ctx.dtypes
        if grad_grad_x is None:
            grad_grad_x = ids_restore.new_zeros(ctx.x_shape, dtype=x_dtype)
        if grad_grad_token is None:
            grad_grad_token = ids_restore.new_zeros((ctx.x_shape[2],), dtype=token_dtype)
        out = ops.mae_unshuffle(grad_grad_x.contiguous(), ids_restore, grad_grad_token.contiguous(), None)
        return out.to(ctx.grad_dtype), None, None, None, None

    torch.library.register_fake(ops.gather_rows)(gather_fake)
    torch.library.register_fake(ops.random_masking)(random_masking_fake)
    torch.library.register_fake(ops.mae_unshuffle)(unshuffle_fake)
    torch.library.register_fake(ops.mae_unshuffle_backward)(unshuffle_backward_fake)
    torch.library.register_autograd(ops.gather_rows, gather_backward, setup_context=gather_setup)
    torch.library.register_autograd(ops.random_masking, random_masking_backward, setup_context=random_masking_setup)
    torch.library.register_autograd(ops.mae_unshuffle, unshuffle_backward, setup_context=unshuffle_setup)
    torch.library.register_autograd(
        ops.mae_unshuffle_backward, unshuffle_backward_backward, setup_context=unshuffle_backward_setup
    )


def _register_backend(backend: str, ops: MaskingOps, *support_checks, masking_checks=()) -> None:
    """Serve the three public ops on ``backend`` through ``ops``."""

    @random_masking_op.register(backend, *support_checks, *masking_checks)
    def _random_masking(x, noise, len_keep, pos_embed):
        x_masked, mask, ids_restore, _ = ops.random_masking(x, noise, len_keep, pos_embed)
        return x_masked, mask, ids_restore

    @mae_unshuffle_op.register(backend, *support_checks)
    def _mae_unshuffle(x, ids_restore, mask_token, pos_embed):
        return ops.mae_unshuffle(x, ids_restore.long(), mask_token, pos_embed)

    @msn_patch_drop_op.register(backend, *support_checks)
    def _msn_patch_drop(x, idx):
        # inverse of the kept-token index, -1 for dropped tokens: the backward gathers by it
        inverse = torch.full((x.shape[1],), -1, dtype=torch.int64, device=x.device)
        inverse = inverse.scatter(0, idx, torch.arange(idx.shape[0], device=x.device))
        return ops.gather_rows(x, idx, inverse, None, None)


# --- triton backend: vitkernels/triton/masking.py -----------------------------------------------------------------

def _triton_device_check(call: dispatch.Call) -> Optional[str]:
    return triton_unavailable_reason(call.device)


def _triton_num_tokens_check(call: dispatch.Call) -> Optional[str]:
    L = call.details.get("num_tokens", 0)
    if L > TRITON_MAX_TOKENS:
        return (
            f"the Triton ranking is O(L^2) per sample; L={L} exceeds {TRITON_MAX_TOKENS} tokens (use the reference, "
            "which sorts)"
        )
    return None


if HAS_TRITON:
    from vitkernels.ops._library import kernel_op
    from vitkernels.triton import masking as triton_kernels

    @kernel_op("vitkernels::triton_gather_rows")
    def triton_gather_rows(
        src: torch.Tensor,
        idx: torch.Tensor,
        inverse_idx: torch.Tensor,
        add: Optional[torch.Tensor],
        out_dtype: Optional[torch.dtype],
    ) -> torch.Tensor:
        """``out[n, k] = src[n, idx[n, k]] (+ add[., idx[n, k]])``, 0 where idx is outside [0, S).

        src (N, S, D); idx (N, K) or (K,) shared by the batch; ``inverse_idx`` (N, S) or (S,) its inverse
        (``idx[inverse_idx[s]] == s`` where ``0 <= inverse_idx[s] < K``, else out of range), used by the backward,
        which is the gather by the inverse; add None or (1 or N, S, D); out_dtype None = promoted (src, add).
        """
        return triton_kernels.gather_rows(src, idx, add, out_dtype)

    @kernel_op("vitkernels::triton_random_masking")
    def triton_random_masking(
        x: torch.Tensor, noise: torch.Tensor, len_keep: int, pos_embed: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_masked, mask, ids_restore, ids_keep): rank the noise, then gather the kept tokens (+ pos_embed)."""
        out_dtype = _gather_out_dtype(x, pos_embed, None)
        ids_restore, ids_keep, mask = triton_kernels.rank_noise(noise, len_keep, out_dtype)
        x_masked = triton_kernels.gather_rows(x, ids_keep, pos_embed, out_dtype)
        return x_masked, mask, ids_restore, ids_keep

    @kernel_op("vitkernels::triton_mae_unshuffle")
    def triton_mae_unshuffle(
        x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """x (N, 1 + keep, D), ids_restore (N, L) int64, mask_token (D,) -> (N, 1 + L, D), promoted dtype."""
        return triton_kernels.mae_unshuffle(x, ids_restore, mask_token, pos_embed)

    @kernel_op("vitkernels::triton_mae_unshuffle_backward")
    def triton_mae_unshuffle_backward(
        grad: torch.Tensor, ids_restore: torch.Tensor, keep: int, x_dtype: torch.dtype, token_dtype: torch.dtype
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """grad (N, 1 + L, D) -> (grad_x (N, 1 + keep, D) in x_dtype, grad_mask_token (D,) in token_dtype)."""
        grad_x, grad_token = triton_kernels.mae_unshuffle_backward(grad, ids_restore, keep, x_dtype)
        return grad_x, grad_token.to(token_dtype)

    TRITON_OPS = MaskingOps(triton_gather_rows, triton_random_masking, triton_mae_unshuffle,
                            triton_mae_unshuffle_backward)
    _register_fakes_and_autograd(TRITON_OPS)
    _register_backend("triton", TRITON_OPS, _triton_device_check, masking_checks=(_triton_num_tokens_check,))
else:
    for _op in (random_masking_op, mae_unshuffle_op, msn_patch_drop_op):
        _op.mark_missing("triton", triton_unavailable_reason(torch.device("cpu")))


# --- native backend: csrc/cpu/masking.cpp, csrc/cuda/masking.cpp ---------------------------------------------------

if _native.is_loaded():
    NATIVE_OPS = MaskingOps(
        torch.ops.vitkernels.gather_rows.default,
        torch.ops.vitkernels.random_masking.default,
        torch.ops.vitkernels.mae_unshuffle.default,
        torch.ops.vitkernels.mae_unshuffle_backward.default,
    )
    _register_fakes_and_autograd(NATIVE_OPS)
    _register_backend("native", NATIVE_OPS, lambda call: _native.native_unavailable_reason("gather_rows", call.device))
else:
    for _op in (random_masking_op, mae_unshuffle_op, msn_patch_drop_op):
        _op.mark_missing("native", _native.IMPORT_ERROR)
