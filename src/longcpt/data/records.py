"""Reading raw text records for tokenizer training and corpus preparation (docs/reference.md, section 1).

Inputs are files, folders or glob patterns of `.jsonl`, `.json` (a JSON array of objects, or
JSON lines), `.parquet` and `.txt` (one document per file). Records stream one at a time, so
inputs larger than memory are fine (a `.json` array is the exception: it is parsed whole; use
`.jsonl` or `.parquet` for big data).

Every bad record is reported, never fatal and never silently dropped: `iter_records` passes a
`Rejection` naming `file:line` (the row number for Parquet) and the reason to a callback and
goes on. A missing input or an unsupported file type is an error naming it.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from longcpt.errors import LongcptError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


@dataclass(frozen=True)
class Rejection:
    """One skipped record: where it is, the kind of problem and a readable detail."""

    location: str  # "file:line" (Parquet: "file:row")
    kind: str  # invalid JSON | not an object | missing field | not a string | empty text | invalid UTF-8 | no tokens
    detail: str

    def as_dict(self) -> dict:
        return {"location": self.location, "kind": self.kind, "reason": self.detail}


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Resolve files, folders (searched recursively) and glob patterns to a sorted file list.

    Args:
        inputs: paths or patterns as given on the command line.

    Returns:
        Files with a supported suffix, in argument order, each pattern/folder sorted, no repeats.

    Raises:
        LongcptError: an input that does not exist, matches nothing, or has an unsupported type.
    """
    if not inputs:
        raise LongcptError("no input given (pass --input FILE_OR_GLOB ...)")
    files: list[Path] = []
    for item in map(str, inputs):
        if any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            found = [p for p in found if p.suffix in SUFFIXES]
            if not found:
                raise LongcptError(f"input {item!r}: the pattern matches no {'/'.join(SUFFIXES)} file")
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise LongcptError(f"input {item!r}: the folder holds no {'/'.join(SUFFIXES)} file")
        elif Path(item).is_file():
            if Path(item).suffix not in SUFFIXES:
                raise LongcptError(f"input {item!r}: unsupported file type {Path(item).suffix or '(none)'!r}; "
                                   f"use one of {', '.join(SUFFIXES)}")
            found = [Path(item)]
        else:
            raise LongcptError(f"input {item!r} not found (check the path)")
        files += [p for p in found if p not in files]
    return files


def check_text(value: object, field: str) -> tuple[str, str] | None:
    """None if `value` is usable document text, else (kind, detail)."""
    if value is None:
        return "not a string", f"field {field!r} is null"
    if not isinstance(value, str):
        return "not a string", f"field {field!r} is {type(value).__name__}, not a string"
    if not value.strip():
        return "empty text", f"field {field!r} is empty or whitespace only"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a "\ud800" escape
        return "invalid UTF-8", f"field {field!r} has an unpaired surrogate at character {e.start}"
    return None


def iter_records(
    files: Sequence[Path], text_field: str, on_reject: Callable[[Rejection], None]
) -> Iterator[tuple[str, int, int]]:
    """Stream the good records of `files`.

    Args:
        files: from `expand_inputs`.
        text_field: the JSON/Parquet field holding the text (ignored for `.txt`).
        on_reject: called with every bad record, which is then skipped.

    Returns:
        An iterator of `(text, file_index, line)`; `line` is 1-based (the row for Parquet).

    Raises:
        LongcptError: a file that cannot be opened or is not Parquet at all.
    """
    readers = {".jsonl": _read_json_lines, ".json": _read_json, ".parquet": _read_parquet, ".txt": _read_txt}
    for index, path in enumerate(files):
        for text, line in readers[path.suffix](path, text_field, on_reject):
            yield text, index, line


def _record_text(obj: object, field: str) -> tuple[str | None, tuple[str, str] | None]:
    if not isinstance(obj, dict):
        return None, ("not an object", f"expected a JSON object with field {field!r}, got {type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(list(obj)[:8]) or "none"
        return None, ("missing field", f"missing field {field!r} (fields: {keys}; set --text-field)")
    problem = check_text(obj[field], field)
    return (None, problem) if problem else (obj[field], None)


def _read_json_lines(path: Path, field: str, on_reject) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines separate nothing and hold no record
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                on_reject(Rejection(f"{path}:{line_no}", "invalid UTF-8", f"invalid UTF-8 at byte {e.start} of the line"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                on_reject(Rejection(f"{path}:{line_no}", "invalid JSON", f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            text, problem = _record_text(obj, field)
            if problem:
                on_reject(Rejection(f"{path}:{line_no}", *problem))
            else:
                yield text, line_no


def _read_json(path: Path, field: str, on_reject) -> Iterator[tuple[str, int]]:
    """A JSON array of objects (parsed element by element, so a bad element is located), or
    JSON lines under a `.json` name (as Hugging Face data sets often ship them)."""
    data = path.read_bytes()
    if not data.lstrip().startswith(b"["):
        yield from _read_json_lines(path, field, on_reject)
        return
    # surrogateescape keeps bad bytes as lone surrogates: check_text then flags only the records
    # that contain them, with the right line.
    text = data.decode("utf-8", errors="surrogateescape")
    seen = [0, 1]  # (offset, line there): offsets only grow, so lines are counted once

    def line_of(offset: int) -> int:
        seen[1] += text.count("\n", seen[0], offset)
        seen[0] = offset
        return seen[1]

    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            where = f"{path}:{line_of(e.pos)}"
            on_reject(Rejection(where, "invalid JSON", f"invalid JSON: {e.msg}; the rest of this array is unreadable "
                                "and was skipped (fix the file or convert it to .jsonl)"))
            return
        text_value, problem = _record_text(obj, field)
        if problem and problem[0] == "invalid UTF-8":
            problem = ("invalid UTF-8", f"field {field!r} has bytes that are not valid UTF-8")
        if problem:
            on_reject(Rejection(f"{path}:{line_of(i)}", *problem))
        else:
            yield text_value, line_of(i)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i += 1
        elif i >= len(text) or text[i] != "]":
            on_reject(Rejection(f"{path}:{line_of(i)}", "invalid JSON", "invalid JSON: expected ',' or ']' "
                                "after an array element; the rest of this array was skipped"))
            return


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_parquet(path: Path, field: str, on_reject) -> Iterator[tuple[str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise LongcptError(f"input {path}: not a readable Parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        keys = ", ".join(pf.schema_arrow.names[:8])
        for row in range(1, pf.metadata.num_rows + 1):
            on_reject(Rejection(f"{path}:{row}", "missing field", f"missing field {field!r} (columns: {keys}; "
                                "set --text-field)"))
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    on_reject(Rejection(f"{path}:{row}", "invalid UTF-8", f"invalid UTF-8 at byte {e.start}"))
                    continue
            problem = check_text(value, field)
            if problem:
                on_reject(Rejection(f"{path}:{row}", *problem))
            else:
                yield value, row


def _read_txt(path: Path, field: str, on_reject) -> Iterator[tuple[str, int]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        on_reject(Rejection(f"{path}:{line}", "invalid UTF-8", f"invalid UTF-8 at byte {e.start} of the file"))
        return
    if not text.strip():
        on_reject(Rejection(f"{path}:1", "empty text", "the file is empty or whitespace only"))
        return
    yield text, 1
