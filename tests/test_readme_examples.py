"""Every ```python example in README.md runs as written, each in a fresh process.

The example text is not edited; each runs as ``python -c`` runs it, as ``__main__``, in a process forked from an
interpreter that has imported torch and the libraries the examples import (timm, transformers, monai) and nothing
else: those imports took ~50 of the ~83 CPU-s that ten fresh interpreters took (timm, transformers and monai
register their models at import, ~4 CPU-s each); the forked process runs the example, its vitkernels import
included, from a clean state (torch has run nothing there: no thread pool is copied). The harness only sets up what
the README's Install section tells a user to set up: the repository on ``PYTHONPATH`` (the tests run from a
checkout, not an installed package), and where the real torchvision does not import, the import-only stand-in
``tests/stubs`` (README, Install). ``TRITON_INTERPRET`` is removed from the example's environment: a user's default,
not the test session's interpreter mode.
"""
import json
import os
import re
import selectors
import signal
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


# The forking server: reads one JSON request a line (code, cwd, stdout / stderr paths), forks, runs the code in the
# child as __main__ with its output in those files, and answers the child's exit status.
_SERVER = r"""
import json, os, sys, traceback
import torch
for name in ("timm", "transformers", "monai"):
    try:
        __import__(name)
    except Exception:
        pass  # the example that needs it fails on its own import
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.chdir(request["cwd"])
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            try:
                exec(compile(request["code"], "<README example>", "exec"), {"__name__": "__main__"})
                status = 0
            except SystemExit as exit:
                status = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(wait_status)}), flush=True)
"""


class ExampleServer:
    """The forking server's process (its own process group, so a timeout stops the example it is running too)."""

    def __init__(self, env, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True)
        assert "ready" in self._reply(600), "the README example server did not start"

    def _reply(self, timeout):
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.close()
                raise TimeoutError(f"no answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the README example server exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, code, cwd, timeout=600):
        """(exit status, stderr) of ``code`` run in ``cwd``."""
        out, err = os.path.join(cwd, "stdout.txt"), os.path.join(cwd, "stderr.txt")
        self.proc.stdin.write(json.dumps(dict(code=code, cwd=str(cwd), stdout=out, stderr=err)) + "\n")
        self.proc.stdin.flush()
        rc = self._reply(timeout)["rc"]
        with open(err) as f:
            return rc, f.read()

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def example_server(example_env, tmp_path_factory):
    server = ExampleServer(example_env, tmp_path_factory.mktemp("readme") / "server.log")
    yield server
    server.close()


@pytest.mark.parametrize("line,code", EXAMPLES, ids=[f"README.md:{line}" for line, _ in EXAMPLES])
def test_readme_example_runs(line, code, example_server, tmp_path):
    rc, stderr = example_server.run(code, tmp_path)
    assert rc == 0, f"README.md example at line {line} failed (exit {rc}):\n{code}\n--- stderr ---\n{stderr[-4000:]}"


def test_an_example_that_fails_is_reported(example_server, tmp_path):
    """The server reports a failing example's exit status and traceback (and keeps serving)."""
    rc, stderr = example_server.run("import torch\nraise ValueError('from the example')", tmp_path)
    assert rc == 1 and "ValueError: from the example" in stderr
    rc, _ = example_server.run("import sys\nsys.exit(3)", tmp_path)
    assert rc == 3
    assert example_server.run("x = 1", tmp_path) == (0, "")
