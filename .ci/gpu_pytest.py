"""pytest plugin of .ci/gpu (loaded with ``-p gpu_pytest``): select by test name, and end a run at its deadline
without losing its reports.

* ``VITKERNELS_PYTEST_DESELECT`` / ``VITKERNELS_PYTEST_SELECT``: comma-separated substrings of the test's own name
  (function name and parameter id, e.g. ``cpu`` or ``torch.compile``): tests whose name contains one are deselected /
  only those are kept. Unlike ``-k``, which also matches the names of the parent directories (a checkout under a
  folder named ``cpu`` would deselect everything), this looks at the test alone.
* ``VITKERNELS_PYTEST_DEADLINE`` (seconds since the epoch): once it has passed, pytest stops after the test in
  progress (``session.shouldstop``), so it still writes ``--benchmark-json`` / ``--junitxml`` and its summary. .ci/gpu
  sends SIGINT only later, as a backstop.
* A benchmark stopped before its first round has no timings, and pytest-benchmark's JSON writer raises on it, losing
  every finished benchmark of the file: such entries are dropped before the JSON is written.
"""
import os
import time

import pytest


def _names(variable):
    return [part.strip() for part in os.environ.get(variable, "").split(",") if part.strip()]


def pytest_collection_modifyitems(config, items):
    drop, keep = _names("VITKERNELS_PYTEST_DESELECT"), _names("VITKERNELS_PYTEST_SELECT")
    if not drop and not keep:
        return
    selected, deselected = [], []
    for item in items:
        name = item.name
        wanted = (not keep or any(k in name for k in keep)) and not any(d in name for d in drop)
        (selected if wanted else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    deadline = os.environ.get("VITKERNELS_PYTEST_DEADLINE")
    if deadline and nextitem is not None and time.time() > float(deadline):
        item.session.shouldstop = "the .ci/gpu time limit of this file is reached"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    bench = getattr(session.config, "_benchmarksession", None)
    if bench is not None:
        bench.benchmarks[:] = [b for b in bench.benchmarks if b]  # a Metadata is falsy without timings
    yield
