"""Resumable predictions files, shared by every evaluation (`Predictions`).

    OUT/run.json            the settings of the run (model, data, decoding, attention, ...)
    OUT/predictions.jsonl   one JSON row per finished example, appended and flushed as it finishes

Running the same command again reads the rows already there and evaluates only the missing ones,
so an interrupted evaluation resumes where it stopped; a last line cut by a crash is dropped and
redone. Resuming with other settings is refused rather than mixing two runs in one file; settings
that only add examples (more lengths, samples, documents) are not among the checked keys, so a
later run extends the same folder.
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


class Predictions:
    """An evaluation's rows in `output`: those already done, and appending new ones (module docstring).

    Usage:
        with Predictions(output, settings, RUN_KEYS, key=row_key, command="longcpt eval ruler") as rows:
            todo = [x for x in wanted if x not in rows.done]
            ...
            rows.append(row)

    Args:
        output: the evaluation's output folder (created).
        settings: recorded in `run.json`.
        keys: the settings a resumed run must share with the rows already there.
        key: a row's identity (`row -> hashable`).
        command: how errors name the command.

    Raises:
        LongcptError: rows from other settings, or a file that is not this command's.
    """

    def __init__(self, output: str | os.PathLike, settings: dict, keys: Sequence[str],
                 key: Callable[[dict], Hashable], command: str):
        self.output, self.settings, self.keys, self.key, self.command = Path(output), settings, keys, key, command
        self.path = self.output / "predictions.jsonl"
        self.done: dict = {}
        self._file = None

    def __enter__(self) -> Predictions:
        self.output.mkdir(parents=True, exist_ok=True)
        check_run(self.output, self.settings, self.keys)
        self.done = read_rows(self.path, self.key, self.command)
        self._file = self.path.open("a")
        return self

    def append(self, row: dict) -> None:
        """Record a finished row (on disk before the next one starts)."""
        append_row(self._file, row)
        self.done[self.key(row)] = row

    def __exit__(self, *exc) -> None:
        self._file.close()
