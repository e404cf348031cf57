"""Every ```python example in README.md runs as written, each in a fresh interpreter.

The example text is not edited. The harness only sets up what the README's Install section tells a user to set
up: the repository on ``PYTHONPATH`` (the tests run from a checkout, not an installed package), and where the real
torchvision does not import, the import-only stand-in ``tests/stubs`` (README, Install). ``TRITON_INTERPRET`` is
removed from the example's environment: a user's default, not the test session's interpreter mode.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
STUBS = os.path.join(ROOT, "tests", "stubs")


def python_examples(path=README):
    """(line number, code) of each fenced ```python block."""
    with open(path) as f:
        text = f.read()
    examples = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        examples.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return examples


def _real_torchvision_imports() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return proc.returncode == 0


EXAMPLES = python_examples()


def test_readme_has_examples():
    assert len(EXAMPLES) >= 4, "README.md lost its Python examples"


@pytest.fixture(scope="module")
def example_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [ROOT] + ([] if _real_torchvision_imports() else [STUBS])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.mark.parametrize("line,code", EXAMPLES, ids=[f"README.md:{line}" for line, _ in EXAMPLES])
def test_readme_example_runs(line, code, example_env, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=example_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (
        f"README.md example at line {line} failed (exit {proc.returncode}):\n{code}\n--- stderr ---\n"
        f"{proc.stderr[-4000:]}")
