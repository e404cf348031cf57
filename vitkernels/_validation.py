"""Argument checks shared by the functional ops.

Every public op validates its inputs before dispatching, so that bad input raises a ``TypeError`` (wrong type or
dtype) or ``ValueError`` (wrong rank, shape, value, device mix) naming the argument, on every backend alike,
instead of a silent wrong answer or an illegal memory access inside a kernel.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

IntPair = Union[int, Sequence[int]]


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[Union[int, Tuple[int, ...]]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of an allowed rank and dtype; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    """Check ``value.shape`` against ``expected`` where ``None`` matches any size."""
    shape = tuple(value.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {want}{extra}, got {shape}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """Check that all given (non-None) tensors live on one device; return it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first_device = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first_device:
            raise ValueError(f"{k} is on {d} but {first_name} is on {first_device}: all inputs must be on one device")
    return first_device


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    """Check that all given (non-None) tensors share one dtype; return it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for k, v in present.items():
        if v.dtype != first.dtype:
            raise TypeError(f"{k} has dtype {v.dtype} but {first_name} has {first.dtype}: they must match")
    return first.dtype


def to_pair(name: str, value: IntPair, *, minimum: int = 1) -> Tuple[int, int]:
    """Turn an int or a pair of ints into a pair, checking every entry is an int ``>= minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        pair = tuple(value)
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must contain ints, got {value!r}")
        if v < minimum:
            bound = "positive" if minimum == 1 else f">= {minimum}"
            raise ValueError(f"{name} must be {bound}, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_int(name: str, value, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_ratio(name: str, value) -> float:
    """Check a masking / drop ratio lies in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {value!r}")
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


INT64_MAX = 2 ** 63 - 1


def check_window_sizes(height: int, width: int, window: Tuple[int, int], batch: int = 1, channels: int = 1) -> None:
    """Check that cutting ``batch`` (height x width) images of ``channels`` into ``window`` windows gives sizes that
    fit int64: the padded image, the tokens per window and the partitioned tensor (the kernels index with int64)."""
    wh, ww = window
    Hp, Wp = -(-height // wh) * wh, -(-width // ww) * ww
    for what, value in (
        ("tokens per window (window_size[0] * window_size[1])", wh * ww),
        ("partitioned rows (B * padded H * padded W)", batch * Hp * Wp),
        ("partitioned elements (rows * channels)", batch * Hp * Wp * channels),
    ):
        if value > INT64_MAX:
            raise ValueError(
                f"window_size {tuple(window)} is too large for a {height}x{width} image: its {what} would be "
                f"{value}, more than int64 can index"
            )
