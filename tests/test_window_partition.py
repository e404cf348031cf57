"""window_partition / window_reverse: every backend vs an independent index formulation, autograd, errors."""
import pytest
import torch

import vitkernels
from vitkernels.ops import window_partition as partition_ops

from helpers import DEVICES, triton_interpreter_or_cuda

CASES = [  # (B, H, W, C, window, shift)
    (2, 14, 14, 8, (7, 7), (3, 3)),
    (1, 9, 10, 5, (7, 7), (3, 3)),   # padding on both axes
    (3, 5, 11, 3, (3, 4), (1, 2)),   # non-square window
    (2, 7, 7, 4, (7, 7), (0, 0)),    # one window, no shift
    (1, 6, 13, 2, (4, 4), (2, 0)),   # shift on one axis only
]


def partition_by_coordinates(x, window, shift):
    """Independent formulation: for every window row, the source pixel from modular coordinates, or zero."""
    B, H, W, C = x.shape
    wh, ww = window
    nWh, nWw = -(-H // wh), -(-W // ww)
    out = torch.zeros(B * nWh * nWw, wh * ww, C, dtype=x.dtype)
    for b in range(B):
        for wy in range(nWh):
            for wx in range(nWw):
                w = (b * nWh + wy) * nWw + wx
                for iy in range(wh):
                    for ix in range(ww):
                        r, s = wy * wh + iy, wx * ww + ix
                        if r < H and s < W:
                            out[w, iy * ww + ix] = x[b, (r + shift[0]) % H, (s + shift[1]) % W]
    return out


def backends_for(device):
    out = ["reference"]
    if partition_ops.partition_op.reasons(vitkernels.dispatch.Call(torch.device(device), torch.float32))["native"] is None:
        out.append("native")
    out.append("triton")
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}w{c[4]}s{c[5]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_partition_and_reverse_match_coordinates(device, backend, case, dtype):
    if backend == "triton":
        triton_interpreter_or_cuda(device)
    if backend == "native" and "native" not in backends_for(device):
        pytest.skip("native backend not built for this device")
    B, H, W, C, window, shift = case
    x = torch.randn(B, H, W, C, dtype=dtype)
    expected = partition_by_coordinates(x, window, shift)
    windows = vitkernels.window_partition(x.to(device), window, shift, backend=backend)
    assert windows.dtype == dtype
    torch.testing.assert_close(windows.cpu(), expected, rtol=0, atol=0)  # a copy: bit exact
    back = vitkernels.window_reverse(windows, H, W, window, shift, backend=backend)
    torch.testing.assert_close(back.cpu(), x, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_reverse_is_adjoint_of_partition(backend):
    """<partition(x), y> == <x, reverse(y)>: what makes each the other's backward."""
    if backend == "triton":
        triton_interpreter_or_cuda("cpu")
    if backend not in backends_for("cpu"):
        pytest.skip("native backend not built")
    x = torch.randn(2, 9, 10, 3, dtype=torch.float64)
    y = torch.randn(2 * 4, 49, 3, dtype=torch.float64)
    lhs = (vitkernels.window_partition(x, 7, 3, backend=backend) * y).sum()
    rhs = (x * vitkernels.window_reverse(y, 9, 10, 7, 3, backend=backend)).sum()
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gradcheck(backend):
    if backend == "triton":
        triton_interpreter_or_cuda("cpu")
    if backend not in backends_for("cpu"):
        pytest.skip("native backend not built")
    # small: under the Triton interpreter every gradcheck perturbation is a kernel launch
    x = torch.randn(1, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * 3, 4, 2, dtype=torch.float64, requires_grad=True)  # 2x3 windows of 2x2
    assert torch.autograd.gradcheck(lambda t: vitkernels.window_partition(t, 2, 1, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: vitkernels.window_reverse(t, 3, 5, 2, 1, backend=backend), (w,))
    assert torch.autograd.gradgradcheck(lambda t: vitkernels.window_partition(t, 2, 1, backend=backend), (x,))


def test_opcheck_native():
    if "native" not in backends_for("cpu"):
        pytest.skip("native backend not built")
    x = torch.randn(2, 9, 10, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkernels.window_partition.default, (x, [7, 7], [3, 3]))
    w = torch.randn(8, 49, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkernels.window_reverse.default, (w, 9, 10, [7, 7], [3, 3]))


def test_opcheck_triton():
    triton_interpreter_or_cuda("cpu")
    x = torch.randn(1, 5, 6, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkernels.triton_window_partition.default, (x, [4, 4], [1, 2]))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_compile_fullgraph(backend):
    if backend not in backends_for("cpu"):
        pytest.skip("native backend not built")
    x = torch.randn(2, 9, 10, 4, requires_grad=True)

    def f(t):
        windows = vitkernels.window_partition(t, 7, 3, backend=backend)
        return vitkernels.window_reverse(windows * 2, 9, 10, 7, 3, backend=backend)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, x * 2)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(2, 9, 10)), ValueError, "x must have 4 dimensions"),
        (dict(x=torch.randn(1, 9, 10, 3).long()), TypeError, "x must have dtype"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(window_size=0), ValueError, "window_size must be positive"),
        (dict(window_size=(7, 7, 7)), TypeError, "window_size"),
        (dict(shift_size=7), ValueError, "shift_size must be smaller than window_size"),
        (dict(shift_size=-1), ValueError, "shift_size must be >= 0"),
        (dict(x=torch.randn(1, 0, 10, 3)), ValueError, "non-empty"),
    ],
)
def test_partition_bad_inputs(kwargs, exc, match):
    args = dict(x=torch.randn(1, 9, 10, 3), window_size=7, shift_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        vitkernels.window_partition(args["x"], args["window_size"], args["shift_size"])


def test_reverse_bad_inputs():
    w = torch.randn(8, 49, 3)
    with pytest.raises(ValueError, match="windows.shape\\[1\\] must be wh \\* ww"):
        vitkernels.window_reverse(w, 9, 10, 6, 3)
    with pytest.raises(ValueError, match="multiple of the 4 windows"):
        vitkernels.window_reverse(w[:7], 9, 10, 7, 3)
    with pytest.raises(ValueError, match="height must be a positive int"):
        vitkernels.window_reverse(w, 0, 10, 7, 3)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        vitkernels.window_partition(torch.randn(1, 7, 7, 1), 7, 0, backend="cuda")
