"""Resumable predictions files, shared by the evaluations that generate (booksum, ruler).

    OUT/run.json            the settings of the run (model, data, decoding, attention, ...)
    OUT/predictions.jsonl   one JSON row per finished example, appended and flushed as it finishes

Running the same command again reads the rows already there and generates only the missing ones,
so an interrupted evaluation resumes where it stopped; a last line cut by a crash is dropped and
redone. Resuming with other settings is refused rather than mixing two runs in one file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

from longcpt.errors import LongcptError
from longcpt.fsio import record_settings


def read_rows(path: Path, key: Callable[[dict], Hashable], command: str) -> dict:
    """Rows already in `path` by `key(row)`. A last line cut by a crash is removed from the file.

    Raises:
        LongcptError: a line that is not a row of this command (named by `file:line`).
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # everything up to the last full line
    if len(complete) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    rows = {}
    for line_no, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows[key(row)] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LongcptError(
                    f"{path}:{line_no}: not a prediction row; this file was not written by {command} "
                    "(use another --output)"
                ) from None
    return rows


def check_run(output: Path, settings: dict, keys: Sequence[str], products: Sequence[str] = ("predictions.jsonl",)) -> None:
    """Record `settings` in `output/run.json`; a folder holding results of an earlier run must have
    been made with the same `keys` (other settings, such as `limit`, may change between runs).

    Args:
        output: the run's folder.
        settings: what run.json records.
        keys: the settings a resumed run must share.
        products: files of `output` whose presence means results of the earlier run are there.

    Raises:
        LongcptError: the folder holds predictions made with other settings.
    """

    def conflict(before: dict, now: dict) -> str | None:
        changed = [k for k in keys if before.get(k) != now.get(k)]
        if not changed or not any((output / name).exists() for name in products):
            return None
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        return (f"--output {output} holds predictions from a run with other settings ({diff}); "
                "use another --output, or delete the folder to start over")

    record_settings(output / "run.json", settings, conflict)


def append_row(f, row: dict) -> None:
    """Append one JSON line and push it to disk before the next example starts."""
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())
