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


class ScriptRun:
    """What a script run printed and returned (`run_script`)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_script(path: Path | str, *args: object) -> ScriptRun:
    """Run a script the way `python PATH ARGS...` does, or a module the way `python -m MODULE ARGS...`
    does (`path` "-m", the module first in `args`): as `__main__`, with that `sys.argv`, in this
    process: what it imports is loaded already here, where a fresh Python spends 3-10 s on it.
    An exception the script does not handle propagates (a fresh Python would print its traceback)."""
    import contextlib
    import io
    import runpy

    module = str(args[0]) if path == "-m" else None
    if module is not None:
        path, args = module, args[1:]
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv, code = [str(path), *map(str, args)], 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if module is None:
                runpy.run_path(str(path), run_name="__main__")
            else:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # sys.exit(n), sys.exit("message") or argparse's exit
        if isinstance(e.code, str):
            err.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
    return ScriptRun(code, out.getvalue(), err.getvalue())


@pytest.fixture(name="run_script", scope="session")
def _run_script_fixture():
    """The `run_script` function, for tests of the data_prep scripts' command lines."""
    return run_script


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

