"""BookSum: reading local files, the prompt template, fine-tuning pairs with the loss on the summary.

Two schemas are read (the two public BookSum releases):
  * chapter level, `kmfoda/booksum`: the text in `chapter`, the reference in `summary_text`
    (the dataset card's own train-eval mapping); ids from `book_id`/`summary_id` when present;
  * book level (e.g. `ubaada/booksum-complete-cleaned`, config `books`): the text in `text`, the
    reference(s) in `summary` - a string, a list of strings, a list of objects with a
    `text`/`summary_text`/`summary` field, or such a list as a JSON string. Several summaries of
    one book are several references (ROUGE takes the best one, as `rouge-score`'s `score_multi`).

Files: `.jsonl`, `.json` (a list of records), `.parquet`, `.csv`. A record that has neither schema,
or an empty or non-string text or summary, is reported with `file:line` and skipped, never fatal.
`prepare_booksum` writes a `datasets` folder with columns `id`, `text`, `summary` (the first
reference) and `references`, plus `report.json`.

Prompt (the template Infini-attention and Unlimiformer-style evaluations use):

    [BOS] Summarize the following text.\\n\\n{text}\\n\\nSummary:      <- prompt
     {summary}[EOS]                                                <- target (the only loss)

Over-long inputs, the same rule for every attention kind: the target keeps up to half of
`seq_len` (cut at its end; then it has no EOS), and the text is cut at its end to fill the rest.
What differs by kind is what `seq_len` can be: `full`, `intra_doc` and `anchor` attend over the
whole row (quadratic cost, bounded by the trained context), while `infini` trains segment by
segment with bounded memory, so its `seq_len` can cover whole books. At evaluation time
`--max-input-tokens` cuts the prompt the same way (no limit by default: Infini streams any length).
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from longcpt.data.datamodule import register_datamodule
from longcpt.data.task import TaskDataModule
from longcpt.errors import LongcptError
from longcpt.fsio import atomic_dir

INSTRUCTION = "Summarize the following text.\n\n"
SUMMARY_CUE = "\n\nSummary:"
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


# ---------------------------------------------------------------------------------------------
# Reading local files


def iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, record) for every record of one file; unreadable lines yield an exception."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    yield f"{path}:{line_no}", json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield f"{path}:{line_no}", ValueError(f"invalid UTF-8 ({e.reason})")
                except json.JSONDecodeError as e:
                    yield f"{path}:{line_no}", ValueError(f"invalid JSON ({e.msg})")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LongcptError(f"{path}: not a JSON file ({e}); expected a list of records") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise LongcptError(f"{path}: expected a JSON list of records (or use .jsonl, one record per line)")
        for i, record in enumerate(data):
            yield f"{path}:[{i}]", record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", record
    elif suffix == ".csv":
        csv.field_size_limit(2**31 - 1)  # whole books in one field
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            _ = reader.fieldnames  # reads the header line
            line = reader.line_num + 1
            for record in reader:
                yield f"{path}:{line}", record
                line = reader.line_num + 1
    else:
        raise LongcptError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _references(value: Any) -> list[str] | None:
    """The reference summaries of a book-level `summary` field, or None if it has none usable."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith(("[", "{")):
            try:
                return _references(json.loads(stripped))
            except json.JSONDecodeError:
                pass
        return [value] if stripped else None
    if isinstance(value, dict):
        for key in ("text", "summary_text", "summary"):
            if isinstance(value.get(key), str) and value[key].strip():
                return [value[key]]
        return None
    if isinstance(value, list):
        refs = [r for item in value for r in (_references(item) or [])]
        return refs or None
    return None


def normalize_record(record: Any) -> tuple[dict | None, str | None]:
    """A record as {"id", "text", "references"}, or (None, reason) when it must be skipped."""
    if not isinstance(record, dict):
        return None, f"not a record (got {type(record).__name__})"
    if "chapter" in record or "summary_text" in record:
        text, refs = record.get("chapter"), record.get("summary_text")
        fields = ("chapter", "summary_text")
        refs = [refs] if isinstance(refs, str) and refs.strip() else None
    elif "text" in record or "summary" in record:
        text, refs = record.get("text"), _references(record.get("summary"))
        fields = ("text", "summary")
    else:
        return None, "no chapter/summary_text (chapter level) or text/summary (book level) fields"
    if not isinstance(text, str) or not text.strip():
        return None, f"field {fields[0]!r} missing, empty or not a string"
    if refs is None:
        return None, f"field {fields[1]!r} missing, empty or not a summary"
    ident = record.get("id")
    if ident is None and record.get("book_id") is not None:
        ident = "/".join(str(record[k]) for k in ("book_id", "summary_id", "source") if record.get(k) is not None)
    return {"id": None if ident is None else str(ident), "text": text, "references": refs}, None


def read_booksum(paths: Iterable[str | Path]) -> tuple[list[dict], dict]:
    """Records of all files as {"id", "text", "summary", "references"} plus a report.

    Ids: the record's own (`id`, or `book_id/summary_id/source`), else `file:line`; repeated ids
    get a `#k` suffix so every row has a unique id (evaluation resumes by id).

    Returns:
        (rows, report): report = {"read", "kept", "rejected": [{"where", "reason"}], "files"}.

    Raises:
        LongcptError: a missing input or an unreadable whole file.
    """
    rows, rejected, read, seen = [], [], 0, {}
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise LongcptError(f"BookSum input(s) not found: {', '.join(missing)}")
    for path in files:
        for where, record in iter_records(path):
            read += 1
            if isinstance(record, Exception):
                rejected.append({"where": where, "reason": str(record)})
                continue
            row, reason = normalize_record(record)
            if row is None:
                rejected.append({"where": where, "reason": reason})
                continue
            ident = row["id"] or f"{path.name}:{where.rsplit(':', 1)[1]}"
            seen[ident] = seen.get(ident, 0) + 1
            if seen[ident] > 1:
                ident = f"{ident}#{seen[ident]}"
            rows.append({"id": ident, "text": row["text"], "summary": row["references"][0],
                         "references": row["references"]})
    report = {"read": read, "kept": len(rows), "rejected": rejected, "files": [str(p) for p in files]}
    return rows, report


def prepare_booksum(paths: Iterable[str | Path], output: str | Path) -> dict:
    """Read local BookSum files and save them as a `datasets` folder with `report.json`.

    Returns:
        The report (also saved as `output/report.json`).

    Raises:
        LongcptError: a missing input, an unreadable file, or no usable record at all.
    """
    from datasets import Dataset

    rows, report = read_booksum(paths)
    if not rows:
        reasons = "; ".join(f"{r['where']}: {r['reason']}" for r in report["rejected"][:3])
        raise LongcptError(f"no usable BookSum record in the input ({report['read']} read; {reasons})")
    with atomic_dir(output) as tmp:
        columns = {k: [r[k] for r in rows] for k in ("id", "text", "summary", "references")}
        Dataset.from_dict(columns).save_to_disk(str(tmp / "data"))
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_booksum(path: str | Path):
    """The `datasets.Dataset` that `prepare_booksum` saved in `path`.

    Raises:
        LongcptError: `path` is not such a folder.
    """
    from datasets import load_from_disk

    path = Path(path)
    if not (path / "data").is_dir():
        raise LongcptError(
            f"--data {path}: not a prepared BookSum folder (expected {path}/data); "
            "make one with python data_prep/prepare_booksum.py --input FILE --output DIR"
        )
    return load_from_disk(str(path / "data"))


# ---------------------------------------------------------------------------------------------
# Prompt and fine-tuning pairs


def booksum_prompt_ids(tokenizer, text: str, max_tokens: int | None = None) -> tuple[list[int], bool]:
    """Prompt tokens for `text`, cut at the text's end so the prompt has at most `max_tokens`.

    Returns:
        (ids, truncated).

    Raises:
        LongcptError: `max_tokens` leaves no room for any text.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + tokenizer.encode(INSTRUCTION, add_special_tokens=False)
    cue = tokenizer.encode(SUMMARY_CUE, add_special_tokens=False)
    body = tokenizer.encode(text, add_special_tokens=False)
    truncated = False
    if max_tokens is not None:
        room = max_tokens - len(head) - len(cue)
        if room < 1:
            raise LongcptError(f"max input tokens {max_tokens}: the template alone takes {len(head) + len(cue)} tokens")
        truncated = len(body) > room
        body = body[:room]
    return head + body + cue, truncated


def booksum_target_ids(tokenizer, summary: str, max_tokens: int) -> list[int]:
    """" {summary}" + EOS, cut to `max_tokens` (a cut summary has no EOS)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return (tokenizer.encode(" " + summary.strip(), add_special_tokens=False) + eos)[:max_tokens]


def read_booksum_pairs(path: str, seq_len: int, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Fine-tuning pairs, one per (text, reference), fitted into `seq_len` (see module docstring)."""
    pairs = []
    for row in load_booksum(path):
        for reference in row["references"]:
            target = booksum_target_ids(tokenizer, reference, max(1, seq_len // 2))
            prompt, _ = booksum_prompt_ids(tokenizer, row["text"], seq_len - len(target))
            pairs.append((prompt, target))
    return pairs


@register_datamodule("booksum")
def build_booksum_datamodule(cfg, tokenizer):
    """The fine-tuning DataModule for `data.task: booksum` (loss on the summary and EOS only)."""
    return TaskDataModule(cfg, tokenizer, functools.partial(read_booksum_pairs, tokenizer=tokenizer))
