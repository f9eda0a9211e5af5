"""Start `longcpt train` many times without paying Python's start-up each time.

`python forkserver.py` imports the training stack once (torch, Lightning, transformers, longcpt:
most of the seconds a fresh `longcpt train` spends before its first step), then reads one JSON
request per line on stdin. `start` forks a child that runs `longcpt.cli.main(argv)` (the
`longcpt` command) or `run_train.main(argv)` (tests/lit/run_train.py: the same `train` on synthetic
data) with its own environment and output file, in its own process group, and replies with its
pid; `wait` replies with its exit status (negative: killed by that signal). The children are real
processes: `kill -9`, SIGTERM, a full disk or a hung collective hit them as they would hit a
fresh `longcpt train`. Forking happens before any torch computation, so no thread pool is copied.

`ForkServer` is the test side. Kill points of the kill -9 suite are installed in a child with the
`hooks` of a request (`kill_points.py`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class Child:
    def __init__(self, server: ForkServer, pid: int, out: Path):
        self.server, self.pid, self.out = server, pid, out
        self.returncode: int | None = None

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def wait(self, timeout: float = 300) -> int:
        """The exit status; after `timeout` seconds the child is killed and TimeoutError raised."""
        if self.returncode is None:
            try:
                self.returncode = self.server.request({"op": "wait", "pid": self.pid}, timeout)["returncode"]
            except TimeoutError:
                self.kill()
                self.returncode = json.loads(self.server.proc.stdout.readline())["returncode"]  # the late reply
                raise
        return self.returncode

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
    """The test side: one server process per pytest session."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
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
              hooks: dict | None = None) -> Child:
        """Fork a child running `entry` ("cli" or "run_train") with `argv`; stdout+stderr go to `out`."""
        reply = self.request({"op": "start", "entry": entry, "argv": [str(a) for a in argv], "out": str(out),
                              "env": {k: str(v) for k, v in (env or {}).items()}, "hooks": hooks})
        return Child(self, reply["pid"], Path(out))

    def run(self, entry: str, argv: list[str], out: Path, timeout: float = 300, **kwargs) -> Child:
        child = self.start(entry, argv, out, **kwargs)
        child.wait(timeout)
        return child

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- the server ---------------------------------------------------------------------------------


def _child(req: dict) -> int:
    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
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
        if req["entry"] == "cli":
            from longcpt.cli import main
        else:
            from run_train import main
        code = main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return int(code or 0)


def serve() -> None:
    sys.path[:0] = [str(HERE), str(HERE.parent / "lit")]
    # The imports a `longcpt train` process pays for before its first step.
    import datasets  # noqa: F401
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
            pid = os.fork()
            if pid == 0:
                os._exit(_child(req))
            reply = {"pid": pid}
        elif req["op"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            reply = {"returncode": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}
        else:
            raise ValueError(req)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
