"""Results of `longcpt doctor`: one row per check, a table for people and JSON for CI.

Every check ends as PASS, FAIL or SKIP with one line saying why (a failure names its fix), plus
the numbers it measured (`data`, in the JSON only). A check that raises is a FAIL whose line is
the exception: the doctor itself never stops at a broken path, it reports it and goes on.
The command exits with 1 when any check failed, else 0.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
STATUSES = (PASS, FAIL, SKIP)


@dataclass
class Result:
    """One row of the report.

    Attributes:
        section: environment | kernels | training.
        name: what was checked (`flash-attn`, `sdpa bf16`, `step ddp x2`, ...).
        status: PASS, FAIL or SKIP.
        detail: one line: what was found, and for a FAIL the fix.
        data: measured numbers and versions (JSON only).
        seconds: wall time of the check.
    """

    section: str
    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r}: must be one of {', '.join(STATUSES)}")


@dataclass(frozen=True)
class Check:
    """A check to run: `run()` yields one or more `Result`s (a generator, or returns a list)."""

    section: str
    name: str
    run: Callable[[], Iterable[Result] | Result]


def run_checks(checks: list[Check], progress: TextIO | None = sys.stderr) -> Iterator[Result]:
    """Run `checks` in order, yielding their results as they come; progress lines go to `progress`.

    An exception inside a check becomes a FAIL row named after the check, with the exception's
    last line as the detail (the traceback goes to `progress`), and the next check runs.
    """
    for i, check in enumerate(checks, 1):
        if progress is not None:
            print(f"[{i}/{len(checks)}] {check.section}: {check.name} ...", file=progress, flush=True)
        start = time.perf_counter()
        try:
            produced = check.run()
            results = [produced] if isinstance(produced, Result) else produced
            for result in results:  # a generator's rows each get the time since the previous row
                result.seconds = result.seconds or round(time.perf_counter() - start, 2)
                if progress is not None:
                    print(f"      {result.status} {result.name}: {result.detail}", file=progress, flush=True)
                yield result
                start = time.perf_counter()
        except Exception as e:  # a broken path is a finding, not a crash of the doctor
            if progress is not None:
                traceback.print_exc(file=progress)
            message = (str(e).strip().splitlines() or [""])[-1]
            yield Result(check.section, check.name, FAIL, f"{type(e).__name__}: {message}"[:300],
                         seconds=round(time.perf_counter() - start, 2))


def exit_code(results: list[Result]) -> int:
    """1 when any check failed, else 0."""
    return 1 if any(r.status == FAIL for r in results) else 0


def summary(results: list[Result]) -> dict[str, int]:
    return {status.lower(): sum(r.status == status for r in results) for status in STATUSES}


def render_table(results: list[Result], width: int | None = None) -> str:
    """A plain-text table: section, check, status and why (wrapped under its column); then counts."""
    width = width or max(80, shutil.get_terminal_size((120, 24)).columns)
    name_w = max([len(r.name) for r in results] + [5])
    section_w = max([len(r.section) for r in results] + [7])
    indent = section_w + name_w + 12
    lines = [f"{'section':<{section_w}}  {'check':<{name_w}}  {'status':<6}  why", "-" * width]
    for r in results:
        why = textwrap.wrap(r.detail, max(30, width - indent)) or [""]
        lines.append(f"{r.section:<{section_w}}  {r.name:<{name_w}}  {r.status:<6}  {why[0]}")
        lines += [" " * indent + more for more in why[1:]]
    counts = summary(results)
    lines += ["-" * width, f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"]
    return "\n".join(lines)


def to_json(results: list[Result], meta: dict[str, Any]) -> str:
    """`{"ok", "summary", "meta", "results": [{section, name, status, detail, data, seconds}]}`."""
    return json.dumps(
        {"ok": exit_code(results) == 0, "summary": summary(results), "meta": meta,
         "results": [asdict(r) for r in results]},
        indent=2, default=str,
    )
