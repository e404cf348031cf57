"""The backend dispatcher: selection order, explicit requests, the environment variable, reasons, info and demo."""
import re

import pytest
import torch

import vitkernels
from vitkernels import dispatch

CPU = torch.device("cpu")


def make_op(**availability):
    """A throwaway op whose backends return their own name; availability maps backend -> reason or None."""
    op = dispatch.Op("toy")
    for backend, reason in availability.items():
        op.register(backend, lambda call, r=reason: r)(lambda backend=backend: backend)
    return op


def test_auto_prefers_native_then_reference_on_cpu():
    op = make_op(triton=None, native=None, reference=None)
    assert op.select(dispatch.Call(CPU, torch.float32))() == "native"
    op = make_op(triton=None, native="not built", reference=None)
    assert op.select(dispatch.Call(CPU, torch.float32))() == "reference"


def test_auto_prefers_triton_on_cuda():
    op = make_op(triton=None, native=None, reference=None)
    assert op.select(dispatch.Call(torch.device("cuda"), torch.bfloat16))() == "triton"
    op = make_op(triton="too big", native=None, reference=None)
    assert op.select(dispatch.Call(torch.device("cuda"), torch.bfloat16))() == "native"


def test_auto_never_picks_triton_for_cpu_tensors():
    op = make_op(triton=None, reference=None)
    assert op.select(dispatch.Call(CPU, torch.float32))() == "reference"
    choice, reasons = op.auto_choice(dispatch.Call(CPU, torch.float32))
    assert choice == "reference" and "interpreter" in reasons["triton"]


def test_explicit_backend_and_its_reason():
    op = make_op(triton="head_dim 300 > 256", reference=None)
    assert op.select(dispatch.Call(CPU, torch.float32), "reference")() == "reference"
    with pytest.raises(dispatch.BackendUnavailableError, match="head_dim 300 > 256"):
        op.select(dispatch.Call(CPU, torch.float32), "triton")
    op.mark_missing("native", "not written yet")
    with pytest.raises(dispatch.BackendUnavailableError, match="not written yet"):
        op.select(dispatch.Call(CPU, torch.float32), "native")


def test_no_backend_lists_every_reason():
    op = make_op(native="no CPU kernel", reference="float8 unsupported")
    with pytest.raises(dispatch.BackendUnavailableError) as info:
        op.select(dispatch.Call(CPU, torch.float32))
    assert "no CPU kernel" in str(info.value) and "float8 unsupported" in str(info.value)


def test_environment_variable(monkeypatch):
    op = make_op(native=None, reference=None)
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "reference")
    assert op.select(dispatch.Call(CPU, torch.float32))() == "reference"
    assert op.select(dispatch.Call(CPU, torch.float32), "native")() == "native"  # the argument wins
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="VITKERNELS_BACKEND must be one of"):
        op.select(dispatch.Call(CPU, torch.float32))


def test_environment_variable_reaches_real_ops(monkeypatch):
    x = torch.randn(1, 7, 7, 2)
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "triton")
    if vitkernels.triton.triton_unavailable_reason(CPU) is not None:
        with pytest.raises(dispatch.BackendUnavailableError, match="triton"):
            vitkernels.window_partition(x, 7, 3)
    monkeypatch.setenv(dispatch.BACKEND_ENV_VAR, "reference")
    assert torch.equal(vitkernels.window_partition(x, 7, 3), vitkernels.window_partition(x, 7, 3, backend="native")
                       if vitkernels._native.is_loaded() else vitkernels.window_partition(x, 7, 3))


def test_support_checks():
    call = dispatch.Call(CPU, torch.float64)
    assert dispatch.dtypes_check(torch.float32)(call) == "dtype float64 not supported (supports float32)"
    assert dispatch.dtypes_check(torch.float64)(call) is None
    assert "cuda" in dispatch.devices_check("cuda")(call)


def test_every_registered_op_has_a_reference_backend():
    for name, op in dispatch.REGISTRY.items():
        assert op.reasons(dispatch.Call(CPU, torch.float32))["reference"] is None, name


def test_info_report_lists_versions_and_every_op():
    from vitkernels import info

    text = info.report()
    # the keys are padded to the longest one, which depends on the machine (CUDA adds rows)
    assert re.search(rf"^torch +: {re.escape(torch.__version__)}$", text, re.M), text
    for name in dispatch.REGISTRY:
        assert f"\n{name}" in text
    assert "auto ->" in text


@pytest.mark.parametrize("avx2", [False, True])
@pytest.mark.parametrize("library", ["aten", "onednn"])
def test_info_names_where_linear_input_gradients_take_aten_mm(monkeypatch, library, avx2):
    """The report's CPU GEMM line says so where the Linears' wide input gradients go to ATen's mm instead of oneDNN
    (vitkernels/ops/linear.py grad_x_through_mm: oneDNN the CPU GEMM, an AVX2-only CPU), and where the layers'
    mid-size forward products do (forward_through_mm), and only there."""
    from vitkernels import info
    from vitkernels.ops import linear as linear_op

    monkeypatch.setattr(linear_op, "CPU_GEMM", library)
    monkeypatch.setattr(linear_op, "_AVX2_CPU", avx2)
    monkeypatch.setattr(linear_op, "OWN_GEMM", False)
    line = info.versions()["CPU float32 GEMM"]
    assert line.startswith(library)
    assert ("input gradients of Linears with >= 768 input features: ATen's mm" in line) == (library == "onednn"
                                                                                              and avx2)
    assert ("MLPs with a large hidden activation (Swin-T stage 1) by blocks of rows through ATen's mm"
            in line) == (library == "onednn" and avx2)
    assert ("layers' forward products with >= 512 rows, >= 192 input features and weights of <= 589824 elements: "
            "ATen's GEMM" in line) == (library == "onednn" and avx2)


@pytest.mark.parametrize("own", [False, True], ids=["oneDNN-products", "own-gemm"])
def test_info_names_whether_the_layers_linears_take_the_own_gemm(monkeypatch, own):
    """The report says whether the layers' Linears run vitkernels' own GEMM (OWN_GEMM) and why; with it, the
    forward-product rule (which it overrides) is not reported, and the blocked MLPs name the own GEMM."""
    from vitkernels import info
    from vitkernels.ops import linear as linear_op

    monkeypatch.setattr(linear_op, "CPU_GEMM", "onednn")
    monkeypatch.setattr(linear_op, "_AVX2_CPU", True)
    monkeypatch.setattr(linear_op, "OWN_GEMM", own)
    monkeypatch.setattr(linear_op, "OWN_GEMM_REASON", "why")
    report = info.versions()
    assert report["CPU own GEMM (layers' Linears)"] == ("on (why)" if own else "off (why)")
    assert ("layers' forward products with" in report["CPU float32 GEMM"]) == (not own)


def test_info_main_runs_as_module():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vitkernels.info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "window_attention" in proc.stdout and "auto ->" in proc.stdout


def test_demo_runs_whole_swin_t_and_agrees():
    from vitkernels import demo

    text = demo.run(["--batch", "1", "--repeats", "2"])
    agreement = [line for line in text.splitlines() if line.startswith("agreement")]
    assert len(agreement) == 2, text
    logits_err = float(agreement[0].split("patched")[-1])
    loss_err = float(agreement[1].split("loss |err|")[-1].split(",")[0])
    grad_err = float(agreement[1].split("gradient error")[-1])
    assert logits_err < 1e-3 and loss_err < 1e-4 and grad_err < 1e-3, text
    timed = [line for line in text.splitlines() if line.startswith(("inference", "train step"))]
    assert len(timed) == 2 and all("speedup" in line and "p25-p75" in line for line in timed), text


def test_triton_interpret_set_after_import_is_explained(monkeypatch):
    """Triton picks interpreter or GPU compiler when vitkernels imports it: a later change is named, not a driver
    error from inside Triton."""
    from vitkernels import triton as vk_triton

    flipped = "0" if vk_triton.interpreter_active() else "1"
    monkeypatch.setenv("TRITON_INTERPRET", flipped)
    reason = vk_triton.triton_unavailable_reason(torch.device("cpu"))
    assert reason is not None and "before the first import" in reason
    if vk_triton.HAS_TRITON:
        with pytest.raises(vitkernels.BackendUnavailableError, match="before the first import"):
            vitkernels.window_partition(torch.randn(1, 7, 7, 4), 7, 3, backend="triton")
