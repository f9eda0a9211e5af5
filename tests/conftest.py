"""Shared fixtures, and how the suite runs (markers, `make test-fast`, xdist, the time budget: suite.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from suite import (  # noqa: F401 (pytest hooks and fixtures, found here by name)
    _unit_tests_start_no_process,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtestloop,
)

pytest_plugins = ("pytester",)  # tests/test_suite.py runs pytest on small test files

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess that must import this checkout's `longcpt`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@pytest.fixture(name="subprocess_env", scope="session")
def _subprocess_env_fixture():
    """The `subprocess_env` function, for tests that start `python -m longcpt ...`."""
    return subprocess_env


@pytest.fixture(scope="session")
def forkserver():
    """Starts `longcpt train` (or tests/lit/run_train.py) children without Python's start-up cost,
    one server per test process (forkserver.py)."""
    from forkserver import ForkServer

    server = ForkServer()
    yield server
    server.close()


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def one_thread():
    """One torch thread for tests that run many small steps (streaming, decoding token by token):
    faster than several on tiny models, and threads do not spin against each other on a loaded
    machine. The previous count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def inductor_cache(request):
    """Inductor's compiled kernels kept in pytest's cache folder (`.pytest_cache/d/inductor`) for
    every test of the session that compiles, and for the next session: compiling FlexAttention
    and its block mask on CPU takes ~30-60 s cold, ~10 s warm. An inductor folder already chosen
    with TORCHINDUCTOR_CACHE_DIR is kept."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        yield Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        return
    folder = request.config.cache.mkdir("inductor")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
        yield folder

