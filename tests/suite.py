"""How the suite runs (pytest hooks imported by tests/conftest.py).

Markers (declared in pyproject.toml):
    slow        several processes (ranks) or an end-to-end run
    subprocess  starts a process: a `longcpt` command, a data_prep script, a compiler (tests using a
                fixture of PROCESS_FIXTURES get it here)
    gpu         needs a CUDA GPU (skipped without one)

`make test` runs every test on all cores (pytest-xdist); `make test-fast` adds `--fast`: only the
unit tests, none marked slow, subprocess or gpu. Under `--fast` a test that starts a process
anyway fails, naming the marker it lacks, so the subset stays what it says.

Under xdist (`--dist loadfile`: a file's tests run on one worker, so its module fixtures, often
whole training runs, are built once):
  * every worker computes with one torch thread (and its subprocesses inherit OMP_NUM_THREADS=1):
    two workers on two cores, each with a full thread pool, would thrash;
  * files with slow tests are handed out first, files with subprocess tests next, so that a long
    test does not start last while the other worker sits idle.
`built_once` builds a folder once per run (a session fixture's data), whichever worker needs it
first; the others wait for it.

`--budget` (what CI passes): after the run, print the 10 slowest tests and fail if the session's
wall time passed `test_budget_seconds` (`test_fast_budget_seconds` with `--fast`; pyproject.toml,
the one place they are written).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

NOT_UNIT = ("slow", "subprocess", "gpu")
# Fixtures that start processes: a test using one is marked `subprocess` here (forkserver: the fork
# server; subprocess_env: for `python -m longcpt ...`; zero_init: DeepSpeed compiles a probe with gcc).
PROCESS_FIXTURES = {"forkserver", "subprocess_env", "zero_init"}
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # set in xdist workers only


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("longcpt")
    group.addoption("--fast", action="store_true",
                    help="only the unit tests (`make test-fast`): none marked " + ", ".join(NOT_UNIT))
    group.addoption("--budget", action="store_true",
                    help="print the 10 slowest tests; fail if the run took longer than test_budget_seconds")
    group.addoption("--timings", metavar="PATH", default=None,
                    help="write each test's wall and CPU seconds (and the run's) to PATH as JSON")
    parser.addini("test_budget_seconds", "wall-time budget of the whole suite under `make test`", default="0")
    parser.addini("test_fast_budget_seconds", "wall-time budget of `make test-fast`", default="0")


def pytest_configure(config: pytest.Config) -> None:
    # This checkout's byte-code is written once and reused by every test process and every process
    # they start (dozens; compiling longcpt from source costs each about 1 s of CPU): some images set
    # PYTHONDONTWRITEBYTECODE=1, which would make every one of them compile it again.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    if WORKERS > 1:
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    config.pluginmanager.register(Budget(config), "longcpt-budget")


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session):
    if not session.config.getoption("fast"):
        return (yield)
    # Python's platform module asks `uname -p` once per process, for whichever test first reads
    # platform.processor() (importing DeepSpeed does): asked here, before the watch starts.
    platform.processor()
    with _processes_watched():  # from the first test on (xdist's start-up runs `uname` once, say)
        return (yield)


# ---- which tests run, where and in what order ----------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.subprocess)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if config.getoption("fast"):
        kept = [item for item in items if not any(m in item.keywords for m in NOT_UNIT)]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items[:] = _slow_files_first(items)


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def _slow_files_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """Files with a slow test first, then those with a subprocess test, then the rest; each file's
    tests stay together and in order (its module fixtures are set up once)."""
    rank: dict[str, int] = {}
    for item in items:
        r = 0 if "slow" in item.keywords else 1 if "subprocess" in item.keywords else 2
        rank[_module(item)] = min(rank.get(_module(item), 2), r)
    order = {m: i for i, m in enumerate(dict.fromkeys(_module(item) for item in items))}
    return sorted(items, key=lambda item: (rank[_module(item)], order[_module(item)]))


# ---- `--fast`: unit tests start no process --------------------------------------------------------

_started: list[str] = []


@contextmanager
def _processes_watched() -> Iterator[None]:
    """Record every process started (subprocess.Popen is what subprocess.run, check_output and the
    libraries' launchers go through); `_unit_tests_start_no_process` fails the test that did it."""
    init = subprocess.Popen.__init__

    def recording_init(self, args, *more, **kwargs):
        _started.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
        init(self, args, *more, **kwargs)

    subprocess.Popen.__init__ = recording_init
    try:
        yield
    finally:
        subprocess.Popen.__init__ = init
        _started.clear()


def _check_no_process(item: pytest.Item) -> None:
    if _started:
        started = _started[:]
        _started.clear()
        pytest.fail(f"{item.nodeid} started a process ({started[0][:200]}); a unit test must not: mark it "
                    "@pytest.mark.subprocess (or slow, for several ranks or an end-to-end run) so that "
                    "`make test-fast` leaves it to `make test`", pytrace=False)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request):
    if not request.config.getoption("fast"):
        yield
        return
    _check_no_process(request.node)  # started while setting up a module or session fixture
    yield
    _check_no_process(request.node)


# ---- one build per run, shared by the workers ------------------------------------------------------


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `build(folder)` fills, built once per test run: under xdist the first worker that
    needs it builds it and the others wait for it, then read the same folder (never write to it).

    Args:
        tmp_path_factory: pytest's session fixture.
        name: the folder's name, unique in the run.
        build: fills the (empty) folder it is given.

    Returns:
        The filled folder.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


# ---- `--budget` -----------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process, of its finished child processes (and theirs) and of the fork
    server's finished children (forkserver.py): unlike wall time, barely changed by other jobs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    forkserver = sys.modules.get("forkserver")
    served = forkserver.ForkServer.children_cpu_total if forkserver else 0.0
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + served


class Budget:
    """Times each test's setup, call and teardown (wall and CPU seconds, the latter carried in the
    reports' user_properties from the xdist workers) and the whole run; with `--budget`, prints the
    slowest tests and fails a run whose wall time passed its budget."""

    def __init__(self, config: pytest.Config):
        controller = not os.environ.get("PYTEST_XDIST_WORKER")
        self.enabled = config.getoption("budget") and controller
        self.timings = config.getoption("timings") if controller else None
        self.key = "test_fast_budget_seconds" if config.getoption("fast") else "test_budget_seconds"
        self.limit = float(config.getini(self.key))
        self.start = time.monotonic()
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.elapsed = 0.0
        self.mark = 0.0

    def pytest_runtest_logstart(self) -> None:
        self.mark = cpu_seconds()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self):
        outcome = yield
        now = cpu_seconds()
        report = outcome.get_result()
        report.user_properties = [*report.user_properties, ("cpu_seconds", now - self.mark)]
        self.mark = now

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration
        self.cpu[report.nodeid] += dict(report.user_properties).get("cpu_seconds", 0.0)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.elapsed = time.monotonic() - self.start
        if self.timings:
            tests = {k: {"wall": round(v, 2), "cpu": round(self.cpu[k], 2)} for k, v in self.seconds.items()}
            Path(self.timings).write_text(json.dumps({"wall": round(self.elapsed, 1), "tests": tests}, indent=1))
        if self.enabled and self.elapsed > self.limit > 0 and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.enabled:
            return
        tr = terminalreporter
        tr.section("test time budget")
        tr.write_line("the 10 slowest tests (setup + call + teardown; wall and CPU seconds, CPU with child processes):")
        for nodeid, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:10]:
            tr.write_line(f"{seconds:8.1f} {self.cpu[nodeid]:8.1f}  {nodeid}")
        load = os.getloadavg()[2] if hasattr(os, "getloadavg") else float("nan")  # a busy machine slows every test
        line = (f"the run took {self.elapsed:.0f} s of wall time ({sum(self.seconds.values()):.0f} s in tests, "
                f"{sum(self.cpu.values()):.0f} s of CPU, summed over workers; load average {load:.1f} on "
                f"{os.cpu_count()} cores); budget {self.limit:.0f} s ({self.key} in pyproject.toml)")
        if self.limit <= 0:
            tr.write_line(line + ": no budget set", yellow=True)
        elif self.elapsed > self.limit:
            tr.write_line(f"FAILED: {line}. Make the slowest tests above leaner (smaller model, fewer steps, a "
                          "shared fixture) rather than raising the budget.", red=True, bold=True)
        else:
            tr.write_line(line, green=True)
