"""How the suite runs (tests/suite.py): `--budget` fails a run over its budget and lists the slowest
tests; `--fast` leaves out the marked tests and fails an unmarked one that starts a process."""

from __future__ import annotations

import pytest

CONFTEST = ("from suite import (_unit_tests_start_no_process, pytest_addoption, pytest_collection_modifyitems,\n"
            "                   pytest_configure, pytest_runtestloop)\n")
INI = "[pytest]\nmarkers =\n  slow: s\n  subprocess: s\n  gpu: g\ntest_budget_seconds = 1\n"


@pytest.fixture
def inner(pytester, monkeypatch):
    """A pytest run in this process with the suite's hooks (as the controller, not an xdist worker)."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    return pytester


def test_budget_fails_a_run_over_it_and_lists_the_slowest_tests(inner):
    inner.makepyfile(test_a="import time\n\ndef test_slow():\n    time.sleep(1.2)\n\ndef test_quick():\n    pass\n")
    over = inner.runpytest("--budget")
    assert over.ret == pytest.ExitCode.TESTS_FAILED
    over.assert_outcomes(passed=2)
    over.stdout.fnmatch_lines(["*the 10 slowest tests*", "*test_a.py::test_slow", "*test_a.py::test_quick",
                               "FAILED: the run took * s of wall time *budget 1 s (test_budget_seconds in pyproject.toml)*"])
    assert inner.runpytest("--budget", "-o", "test_budget_seconds=600").ret == pytest.ExitCode.OK
    assert inner.runpytest().ret == pytest.ExitCode.OK  # no --budget: no check


@pytest.mark.subprocess
def test_fast_leaves_out_marked_tests_and_fails_an_unmarked_one_that_starts_a_process(inner):
    inner.makepyfile(test_b="""
import subprocess
import pytest

def test_unit():
    pass

def test_starts_one():
    subprocess.run(["true"], check=True)

@pytest.mark.subprocess
def test_marked():
    subprocess.run(["true"], check=True)
""")
    fast = inner.runpytest("--fast")
    fast.assert_outcomes(passed=2, errors=1, deselected=1)  # test_starts_one passes, then errors at teardown
    fast.stdout.fnmatch_lines(["*test_b.py::test_starts_one started a process (true); a unit test must not: "
                               "mark it @pytest.mark.subprocess*"])
    inner.runpytest().assert_outcomes(passed=3)  # without --fast every test runs and nothing is checked
