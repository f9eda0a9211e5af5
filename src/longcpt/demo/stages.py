"""Resumable stages: each runs once, and an interrupted pipeline continues from the finished ones.

A stage is a function that writes its outputs completely or not at all (atomic writes from
`longcpt.fsio`; training runs resume from their last checkpoint). When it returns, its marker
`OUTPUT/stages/NAME.json` is written, atomically and last: {"stage", "seconds", "cpu_seconds",
"result"}. A later run finds the marker, skips the stage and reuses its result; a stage without a
marker (never run, or interrupted) runs again from the start of its own outputs.

    stages = StageRunner(output, total=3)
    n = stages("corpus", "demo corpus", build)["documents"]
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longcpt.fsio import atomic_write_json


@dataclass
class StageTime:
    name: str
    title: str
    seconds: float  # wall time
    cpu_seconds: float  # user + system time of this process and its finished children
    reused: bool  # finished by an earlier run


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StageRunner:
    """Runs named stages in order, skipping those an earlier run finished.

    Args:
        output: the pipeline's output folder (markers go to `output/stages/`).
        total: number of stages, for the "[3/11]" counters.
        say: prints a stage header (default: a Rich rule on stdout).
    """

    def __init__(self, output: Path, total: int, say: Callable[[str], None] | None = None):
        self.folder = Path(output) / "stages"
        self.total = total
        self.count = 0
        self.times: list[StageTime] = []
        self._say = say or _rule

    def marker(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def __call__(self, name: str, title: str, fn: Callable[[], dict | None]) -> dict:
        """Run `fn` unless stage `name` is already finished; returns its (JSON-ready) result."""
        self.count += 1
        header = f"[{self.count}/{self.total}] {title}"
        marker = self.marker(name)
        if marker.is_file():
            record = json.loads(marker.read_text())
            self.times.append(StageTime(name, title, record["seconds"], record.get("cpu_seconds", 0.0), True))
            print(f"{header}: finished by an earlier run ({record['seconds']:.0f} s), reused", flush=True)
            return record["result"]
        self._say(header)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        result = fn() or {}
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        atomic_write_json(marker, {"stage": name, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                                   "result": result})
        self.times.append(StageTime(name, title, round(wall, 1), round(cpu, 1), False))
        print(f"{header}: {wall:.0f} s", flush=True)
        return result


def _rule(text: str) -> None:
    from rich.console import Console

    Console().rule(f"[bold]{text}")
