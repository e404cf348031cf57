"""Test session setup.

* With no CUDA device, Triton kernels run on CPU tensors under the Triton interpreter: ``TRITON_INTERPRET=1`` must be
  set before triton is first imported, so it is set here, before anything imports vitkernels.
* timm imports torchvision, whose PyPI wheel does not import beside a CPU build of torch; when the real torchvision
  is unusable, ``tests/stubs`` provides an import-only stand-in so that timm's Swin / ViT / DeiT can be compared.
* The interpreter's int32 overflow checks are off for the session: by default it computes them and drops the assert
  (debug off), which more than doubles the time of the index-heavy kernels for nothing. The cheap
  launch-configuration examples run them asserting: see ``helpers.set_interpreter_overflow_checks``.
* The interpreter does not re-patch ``triton.language`` at each ``@triton.jit`` helper call inside a launch (a
  quarter of the attention kernels' interpreted time): see ``helpers.skip_interpreter_repatching_in_device_calls``.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_STUBS = os.path.join(os.path.dirname(__file__), "stubs")


def _ensure_torchvision_importable() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, _STUBS)


_ensure_torchvision_importable()

if os.environ.get("TRITON_INTERPRET") == "1":
    from helpers import set_interpreter_overflow_checks, skip_interpreter_repatching_in_device_calls

    set_interpreter_overflow_checks(False)
    skip_interpreter_repatching_in_device_calls()

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
