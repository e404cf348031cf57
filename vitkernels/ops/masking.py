"""Op: token masking for MAE and MSN (random masking, decoder unshuffle, MSN patch drop) and MAE's patchify.

Public functions validate their arguments and dispatch to

* ``reference`` -- :mod:`vitkernels.reference.masking` (the official argsort + gather + repeat + cat steps),
* ``native``    -- not written yet (the C++ masking kernels are a separate issue),
* ``triton``    -- not written yet.

Random draws (MAE noise, MSN permutation) happen here, before dispatch, with the official code's calls
(``torch.rand(N, L, device=x.device)``, ``torch.randperm(L)``), so every backend sees the same randomness and a seed
gives the same masks as the official code.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from vitkernels import dispatch
from vitkernels._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_int,
    check_ratio,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from vitkernels.reference import masking as reference

random_masking_op = dispatch.op(
    "random_masking", "MAE per-sample random masking: rank noise, gather kept tokens (+ pos-embed), binary mask"
)
mae_unshuffle_op = dispatch.op(
    "mae_unshuffle", "MAE decoder input: mask tokens + unshuffle by ids_restore, CLS in front, + decoder pos-embed"
)
msn_patch_drop_op = dispatch.op("msn_patch_drop", "MSN patch drop: keep a batch-shared random subset, CLS in front")

NATIVE_MISSING = "no C++ kernels for the masking ops yet (a separate issue)"
TRITON_MISSING = "no Triton kernels for the masking ops yet"


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
        pos_embed: optional (1, L, D) or (N, L, D) in ``x``'s dtype, added to ``x`` before the gather (pass the
            official encoder's ``pos_embed[:, 1:, :]``).
        backend: ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"reference"``.

    Returns:
        ``(x_masked (N, len_keep, D), mask (N, L) in x.dtype (1 = removed), ids_restore (N, L) int64)``, as
        :func:`vitkernels.reference.masking.random_masking` (stable tie-break by patch index).
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
        check_same_dtype(x=x, pos_embed=pos_embed)
    check_same_device(x=x, noise=noise, pos_embed=pos_embed)
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    len_keep = reference.num_kept(L, ratio)
    impl = random_masking_op.select(dispatch.Call(x.device, x.dtype, {"num_tokens": L}), backend)
    return impl(x, noise, len_keep, pos_embed)


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
            permutation of ``range(L)`` per row (as :func:`random_masking` returns); this is not checked, since
            that would need a device synchronisation; the kernels never read or write out of bounds.
        mask_token: (1, 1, D) or (D,) in ``x``'s dtype.
        pos_embed: optional (1, 1 + L, D) or (N, 1 + L, D) decoder positional embedding in ``x``'s dtype.
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
    check_same_dtype(x=x, mask_token=mask_token, pos_embed=pos_embed)
    check_same_device(x=x, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
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
            (CPU generator, as the official code) when None. A CPU ``perm`` is checked to be a permutation; one on
            a GPU is not (that would synchronise), the kernels never read out of bounds.
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
        raise ValueError(f"imgs height and width must be positive multiples of patch_size={p}, got shape {tuple(imgs.shape)}")


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


for _op in (random_masking_op, mae_unshuffle_op, msn_patch_drop_op):
    _op.mark_missing("native", NATIVE_MISSING)
    _op.mark_missing("triton", TRITON_MISSING)
