"""Atomic writes: outputs appear whole or not at all (a crash never leaves half a file/folder).

Used by every writer of user-visible outputs: HF folders, prepared data sets, reports,
evaluation results, checkpoints. `record_settings` keeps a resumable run's settings beside its
outputs, so that a rerun with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from longcpt.errors import LongcptError


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    On error the temporary folder is removed and an existing `path` is left untouched. When `path`
    exists it is moved aside first and deleted only after the new folder is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces `path` in one rename.

    The file gets the permissions a plain `open(path, "w")` would give (mkstemp makes 0600, which
    would hide results from the colleagues sharing a cluster folder). On error the temporary file
    is removed and an existing `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same folder and `os.replace`."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def record_settings(path: str | os.PathLike, settings: dict, conflict: Callable[[dict, dict], str | None]) -> None:
    """Record a run's `settings` in the JSON file `path`, unless the run recorded there conflicts.

    A resumable command (an evaluation, the demo) calls this before it continues the outputs in
    `path`'s folder. Which differences matter is the caller's rule: `conflict(before, now)`.

    Args:
        path: the settings file (e.g. OUT/run.json).
        settings: this run's settings; JSON types (tuples are recorded, and compared, as lists).
        conflict: `conflict(before, now)` -> None when this run may continue the one that recorded
            `before`, else the message that says what differs and what to do.

    Raises:
        LongcptError: the conflict's message, or `path` is not a JSON object.
    """
    path = Path(path)
    now = json.loads(json.dumps(settings))  # as it will read back
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LongcptError(f"{path}: not a settings file ({e}); use another output folder") from None
        if not isinstance(before, dict):
            raise LongcptError(f"{path}: not a settings file (a JSON object); use another output folder")
        problem = conflict(before, now)
        if problem:
            raise LongcptError(problem)
    atomic_write_json(path, now)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file under a folder, to disk before it is renamed into place."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
