"""Raw text -> a tokenized `datasets` data set on disk, one row per document (docs/reference.md, section 1).

    records (streamed, validated) --Dataset.from_generator--> Arrow (text, file, line)
        --map(batched, num_proc): tokenizers' encode_batch--> Arrow (input_ids, file, line)
        --save_to_disk--> OUTPUT/ (column input_ids, no BOS/EOS) + OUTPUT/report.json

Memory stays bounded: records stream from the inputs into Arrow files in batches, and `map`
works batch by batch on the memory-mapped result. Bad records are skipped and reported with
`file:line` and the reason in `report.json` (every one of them also in `rejected.jsonl`). The
output folder appears only when complete (`atomic_dir`).

With `val_fraction > 0` the output holds two data sets, `OUTPUT/train` and `OUTPUT/val` (a
`DatasetDict`), documents drawn at random (seeded) for validation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from longcpt.data.records import Rejection, expand_inputs, iter_records
from longcpt.errors import LongcptError
from longcpt.fsio import atomic_dir

MAX_REPORTED = 100_000  # rejections listed in report.json; rejected.jsonl always has them all


def prepare_corpus(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    output: str | Path,
    *,
    text_field: str = "text",
    num_proc: int = 1,
    val_fraction: float = 0.0,
    seed: int = 0,
    batch_size: int = 1000,
    progress: bool = True,
) -> dict:
    """Tokenize text records into a data set of documents.

    Args:
        inputs: files, folders or globs of `.jsonl`, `.json`, `.parquet`, `.txt`.
        tokenizer: tokenizer folder (`data_prep/train_tokenizer.py` output or an HF model folder).
        output: folder to write; replaced atomically when the run succeeds.
        text_field: field holding the text in JSON/Parquet records.
        num_proc: tokenizing processes. With 1, the `tokenizers` library itself uses every core.
        val_fraction: share of documents held out as `OUTPUT/val` (0 = no split).
        seed: seed of the validation draw.
        batch_size: documents per tokenizer call and per Arrow write.
        progress: show `datasets` progress bars.

    Returns:
        The report also written to `OUTPUT/report.json`: counts `read`, `kept`, `rejected`,
        `tokens`, `rejected_by_kind`, `rejections` (location, kind, reason), `splits`.

    Raises:
        LongcptError: a missing input or tokenizer, bad options, or no usable record at all.
    """
    from longcpt.data.tokenizer import load_tokenizer

    if num_proc < 1:
        raise LongcptError(f"--num-proc {num_proc}: must be >= 1")
    if not 0 <= val_fraction < 1:
        raise LongcptError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    files = expand_inputs(inputs)
    backend = load_tokenizer(tokenizer).backend_tokenizer
    output = Path(output)
    with _progress_bars(progress), _scratch(output) as scratch, atomic_dir(output) as tmp:
        rejected_path = tmp / "rejected.jsonl"
        raw = _read_records(files, text_field, rejected_path, scratch, batch_size)
        docs = _tokenize(raw, backend, num_proc, batch_size)
        lengths = _lengths(docs)  # (documents,) tokens of each
        keep = _reject_empty(docs, lengths, files, rejected_path)
        rejections = _summarize_rejections(rejected_path)
        if len(keep) == 0:
            raise LongcptError(_nothing_kept(files, rejections))
        parts = _split(keep, val_fraction, seed) if val_fraction > 0 else {"train": keep}
        _save(docs.remove_columns(["file", "line"]), parts, tmp, as_splits=val_fraction > 0)
        counts = {name: {"documents": len(rows), "tokens": int(lengths[rows].sum())} for name, rows in parts.items()}
        report = _report(files, tokenizer, text_field, counts, rejections)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        del raw, docs  # release the memory maps before the scratch folder goes
    return report


def _read_records(files: list[Path], text_field: str, rejected_path: Path, scratch: Path, batch_size: int):
    """Every good record as a row (`text`, `file`, `line`) of an Arrow data set in `scratch`; bad
    ones go to `rejected_path`.

    Raises:
        LongcptError: no record at all was usable.
    """
    from datasets import Dataset, Features, Value

    try:
        return Dataset.from_generator(
            _records,
            features=Features({"text": Value("large_string"), "file": Value("int32"), "line": Value("int64")}),
            # a tuple, not a list: datasets would shard a list and call the generator per file
            gen_kwargs={"files": tuple(str(f) for f in files), "text_field": text_field,
                        "rejected_path": str(rejected_path)},
            cache_dir=str(scratch / "cache"),
            writer_batch_size=batch_size,
        )
    except ValueError as e:
        if "no data" not in str(e):  # datasets' complaint when the generator yields nothing
            raise
        raise LongcptError(_nothing_kept(files, _summarize_rejections(rejected_path))) from None


def _tokenize(raw, backend, num_proc: int, batch_size: int):
    """`raw` with its text replaced by `input_ids` (int32), in `num_proc` processes."""
    from datasets import Features, List, Value

    with _tokenizer_threads(num_proc):
        return raw.map(
            _encode,
            batched=True,
            batch_size=batch_size,
            writer_batch_size=batch_size,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["text"],
            features=Features({"input_ids": List(Value("int32")), "file": Value("int32"), "line": Value("int64")}),
            fn_kwargs={"tokenizer": backend},
            new_fingerprint=f"encode-{os.getpid()}-{id(raw)}",
            desc="tokenizing",
        )


def _reject_empty(docs, lengths: np.ndarray, files: list[Path], rejected_path: Path) -> np.ndarray:
    """Rows with at least one token; the others (text a tokenizer normalises away) are rejected."""
    keep = np.flatnonzero(lengths > 0)
    if len(keep) < len(lengths):
        with open(rejected_path, "a") as f:
            f.writelines(json.dumps(r.as_dict()) + "\n" for r in _no_tokens(docs, lengths, files))
    return keep


def _save(docs, parts: dict[str, np.ndarray], folder: Path, as_splits: bool) -> None:
    """`docs` rows of each part saved to `folder`: a DatasetDict (train/val) or one data set."""
    from datasets import DatasetDict

    splits = {name: docs.select(rows) for name, rows in parts.items()}
    if as_splits:
        DatasetDict(splits).save_to_disk(str(folder))
    else:
        splits["train"].save_to_disk(str(folder))


@contextmanager
def _progress_bars(enabled: bool):
    """`datasets`' progress bars on or off for the duration (restored after)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets.enable_progress_bars()


def _records(files: tuple[str, ...], text_field: str, rejected_path: str):
    """Generator for `Dataset.from_generator`: good records as rows, bad ones to a jsonl file
    (a file rather than a list, so it works whichever process runs the generator)."""
    with open(rejected_path, "w") as out:
        def reject(r: Rejection) -> None:
            out.write(json.dumps(r.as_dict()) + "\n")

        for text, file, line in iter_records([Path(f) for f in files], text_field, reject):
            yield {"text": text, "file": file, "line": line}


def _encode(batch: dict, tokenizer) -> dict:
    # No special tokens: packing adds BOS/EOS (`longcpt.data.packing`). Text that spells a special token
    # ("</s>" in an HTML page) is encoded as plain text, so no stray BOS/EOS splits a document.
    # Set here, per call, because the flag does not survive pickling to `num_proc` workers.
    tokenizer.encode_special_tokens = True
    encodings = tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
    return {"input_ids": [e.ids for e in encodings], "file": batch["file"], "line": batch["line"]}


@contextmanager
def _tokenizer_threads(num_proc: int):
    """With several processes, each tokenizes single-threaded (processes give the parallelism);
    with one, `tokenizers` uses a thread per core. Avoids num_proc x cores threads."""
    if num_proc == 1:
        yield
        return
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


@contextmanager
def _scratch(output: Path):
    """Intermediate Arrow files beside the output (same disk), removed in every case."""
    output.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{output.name}.scratch-", dir=output.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _summarize_rejections(path: Path) -> dict:
    """Count the rejections by kind and keep the first MAX_REPORTED, streaming `rejected.jsonl`."""
    total, by_kind, listed = 0, Counter(), []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            total += 1
            by_kind[r["kind"]] += 1
            if len(listed) < MAX_REPORTED:
                listed.append(r)
    return {"total": total, "by_kind": dict(by_kind), "listed": listed}


def _lengths(ds) -> np.ndarray:
    """Tokens per document, read from the Arrow list offsets (no token is touched). Only for a
    data set without an indices mapping (`select` output), whose table is its rows."""
    import pyarrow.compute as pc

    col = ds.data.column("input_ids")
    return np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int64)


def _no_tokens(docs, lengths: np.ndarray, files: list[Path]) -> list[Rejection]:
    rows = docs.select_columns(["file", "line"]).select(np.flatnonzero(lengths == 0))
    return [Rejection(f"{files[r['file']]}:{r['line']}", "no tokens", "the tokenizer produced no token") for r in rows]


def _split(rows: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Draw validation documents at random (seeded); both parts keep the stored order."""
    n = len(rows)
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise LongcptError(f"--val-fraction {val_fraction}: {n} document(s) leave none for training; "
                           "lower it or add data")
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n, size=n_val, replace=False)] = True
    return {"train": rows[~is_val], "val": rows[is_val]}


def _nothing_kept(files: list[Path], rejections: dict) -> str:
    where = ", ".join(map(str, files))
    if not rejections["total"]:
        return f"no record in {where}"
    first = rejections["listed"][0]
    return (f"no usable record in {where}: all {rejections['total']} rejected "
            f"(first: {first['location']}: {first['reason']})")


def _report(files, tokenizer, text_field, counts: dict, rejections: dict) -> dict:
    kept = sum(c["documents"] for c in counts.values())
    return {
        "inputs": [str(f) for f in files],
        "tokenizer": str(tokenizer),
        "text_field": text_field,
        "read": kept + rejections["total"],
        "kept": kept,
        "rejected": rejections["total"],
        "tokens": sum(c["tokens"] for c in counts.values()),
        "rejected_by_kind": rejections["by_kind"],
        "rejections": rejections["listed"],
        "rejections_not_listed": rejections["total"] - len(rejections["listed"]),
        "splits": counts,
    }
