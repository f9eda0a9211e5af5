"""Start `longcpt train` many times without paying Python's start-up each time.

A tiny run of `longcpt train` in a fresh process spends ~7 CPU seconds importing torch, Lightning,
transformers and DeepSpeed before its first step, far more than its steps; the tests that run it
in a child process (kills, signals, several ranks, the command line) start it from here instead.

`python forkserver.py` imports the training stack once (torch, Lightning, transformers, DeepSpeed,
longcpt: most of the seconds a fresh `longcpt train` spends before its first step), then reads one JSON
request per line on stdin. `start` forks a child that runs `longcpt.cli.main(argv)` (the
`longcpt` command) or `run_train.main(argv)` (tests/lit/run_train.py: the same `train` on synthetic
data) with its own environment and output file, in its own process group, and replies with its
pid; `wait` replies with its exit status (negative: killed by that signal). The children are real
processes: `kill -9`, SIGTERM, a full disk or a hung collective hit them as they would hit a
fresh `longcpt train`. Forking happens before any torch computation, so no thread pool is copied.

`ForkServer` is the test side (tests/conftest.py's session fixture `forkserver`): `run` one child,
or `run_ranks` to start a multi-process run's ranks together, as srun or torchrun start them (a
child cannot use Lightning's own launcher, which re-runs this server's command line). Kill points
of the kill -9 suite are installed in a child with the `hooks` of a request (faults/kill_points.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    def __init__(self, server: ForkServer, pid: int, out: Path, err: Path | None = None):
        self.server, self.pid, self.out, self.err = server, pid, out, err
        self.returncode: int | None = None

    def output(self) -> str:
        """What the child wrote to stdout (and to stderr, unless it was started with `err`)."""
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def errors(self) -> str:
        """What the child wrote to stderr, when it was started with `err`."""
        return self.err.read_text(errors="replace") if self.err and self.err.exists() else ""

    def wait(self, timeout: float = 300) -> int:
        """The exit status; after `timeout` seconds the child is killed and TimeoutError raised."""
        if self.returncode is None:
            try:
                reply = self.server.request({"op": "wait", "pid": self.pid}, timeout)
            except TimeoutError:
                self.kill()
                self._ended(json.loads(self.server.proc.stdout.readline()))  # the late reply
                raise
            self._ended(reply)
        return self.returncode

    def _ended(self, reply: dict) -> None:
        self.returncode = reply["returncode"]
        self.server.children_cpu += reply["cpu"]
        ForkServer.children_cpu_total += reply["cpu"]

    def wait_for_line(self, prefix: str, timeout: float = 300) -> str:
        """Block until a line starting with `prefix` appears in the child's output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith(prefix):
                    return line
            time.sleep(0.05)
        raise TimeoutError(f"no line starting with {prefix!r} in {timeout}s:\n{self.output()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class ForkServer:
    """The test side: one server process per pytest session.

    `children_cpu_total`: CPU seconds of the children that ended, over every open server (tests/suite.py
    adds it to each test's CPU time; a server's own children count in its process once it is closed).
    """

    children_cpu_total = 0.0

    def __init__(self):
        self.children_cpu = 0.0
        # DS_ACCELERATOR: DeepSpeed is imported here, and these CPU runs must not make it probe CUDA.
        # A launch environment left in this process must not make every child a rank of some run.
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        env.update({"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.request({"op": "ping"}, timeout=600)  # the imports

    def request(self, req: dict, timeout: float = 300) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"fork server: no reply to {req} in {timeout}s")
        return json.loads(self.proc.stdout.readline())

    def start(self, entry: str, argv: list[str], out: Path, env: dict | None = None,
              hooks: dict | None = None, err: Path | None = None) -> Child:
        """Fork a child running `entry` ("cli", "run_train" or a module with `main(argv)`) with `argv`;
        stdout goes to `out`, stderr too unless `err` names another file."""
        reply = self.request({"op": "start", "entry": entry, "argv": [str(a) for a in argv], "out": str(out),
                              "err": str(err) if err else None,
                              "env": {k: str(v) for k, v in (env or {}).items()}, "hooks": hooks})
        return Child(self, reply["pid"], Path(out), Path(err) if err else None)

    def run(self, entry: str, argv: list[str], out: Path, timeout: float = 300, **kwargs) -> Child:
        child = self.start(entry, argv, out, **kwargs)
        child.wait(timeout)
        return child

    def start_ranks(self, entry: str, argv: list[str], logs: Path, world: int = 2, env: dict | None = None,
                    **kwargs) -> list[Child]:
        """Start `world` ranks of one run on this machine, each with the launch environment srun or
        torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); rank r writes
        `logs`-r.log."""
        launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "NODE_RANK": 0, "WORLD_SIZE": world}
        return [self.start(entry, argv, logs.with_name(f"{logs.name}-{r}.log"),
                           env={**launch, **(env or {}), "RANK": r, "LOCAL_RANK": r}, **kwargs) for r in range(world)]

    def run_ranks(self, entry: str, argv: list[str], logs: Path, timeout: float = 300, **kwargs) -> list[Child]:
        """`start_ranks`, then wait for every rank (a rank that fails ends the others with a timeout
        of the process group, or here after `timeout` seconds)."""
        ranks = self.start_ranks(entry, argv, logs, **kwargs)
        for child in ranks:
            child.wait(timeout)
        return ranks

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        ForkServer.children_cpu_total -= self.children_cpu  # now in this process's RUSAGE_CHILDREN


# ---- the server ---------------------------------------------------------------------------------


def _child(req: dict, replies) -> int:
    replies.close()  # the server's reply channel is not the child's
    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if req.get("err") else out, 2)
    os.environ.update(req["env"])
    import torch
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero

    torch.set_num_threads(1)
    # What a fresh import computes from the environment (RANK, LOCAL_RANK, SLURM_PROCID, ...).
    rank_zero.rank_zero_only.rank = fabric_rank_zero.rank_zero_only.rank = fabric_rank_zero._get_rank() or 0
    if req.get("hooks"):
        import kill_points

        kill_points.install(req["hooks"])
    try:
        code = _entry(req["entry"]).main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return int(code or 0)


def _entry(entry: str):
    if entry.endswith(".py"):  # a script: run as a module named after its file (not __main__)
        spec = importlib.util.spec_from_file_location(Path(entry).stem, entry)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module("longcpt.cli" if entry == "cli" else entry)


def serve() -> None:
    sys.path[:0] = [str(HERE), str(HERE / "lit"), str(HERE / "faults")]
    # Replies go to the original stdout; whatever the libraries print goes to stderr instead.
    replies = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    # The imports a `longcpt train` process pays for before its first step.
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import run_train  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import longcpt.cli  # noqa: F401
    import longcpt.data.datamodule  # noqa: F401
    import longcpt.lit.train  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "ping":
            reply = {}
        elif req["op"] == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            replies.flush()
            pid = os.fork()
            if pid == 0:
                os._exit(_child(req, replies))
            reply = {"pid": pid}
        elif req["op"] == "wait":
            _, status, usage = os.wait4(req["pid"], 0)
            reply = {"returncode": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status),
                     "cpu": usage.ru_utime + usage.ru_stime}
        else:
            raise ValueError(req)
        print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
    serve()
