"""BookSum preparation (both schemas, every file type, bad records) and summary-only labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import bpe_tokenizer

from longcpt.data.booksum import (
    INSTRUCTION,
    SUMMARY_CUE,
    booksum_prompt_ids,
    load_booksum,
    prepare_booksum,
    read_booksum,
    read_booksum_pairs,
)
from longcpt.data.task import answer_only_row
from longcpt.errors import LongcptError

REPO = Path(__file__).resolve().parents[2]
CHAPTERS = [
    {"bid": 1, "book_id": "emma", "summary_id": "chapter 1", "source": "cliffnotes",
     "chapter": "Emma Woodhouse, handsome, clever, and rich.", "summary_text": "Emma is introduced."},
    {"bid": 1, "book_id": "emma", "summary_id": "chapter 2", "source": "cliffnotes",
     "chapter": "Mr. Weston was a native of Highbury.", "summary_text": "Mr. Weston's story."},
]


def test_reads_chapter_level_in_every_format(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAPTERS))
    (tmp_path / "a.json").write_text(json.dumps(CHAPTERS))
    pq.write_table(pa.Table.from_pylist(CHAPTERS), tmp_path / "a.parquet")
    with (tmp_path / "a.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CHAPTERS[0]))
        w.writeheader()
        w.writerows(CHAPTERS)
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv"):
        rows, report = read_booksum([tmp_path / name])
        assert [(r["text"], r["summary"]) for r in rows] == [(c["chapter"], c["summary_text"]) for c in CHAPTERS]
        assert rows[0]["id"] == "emma/chapter 1/cliffnotes"
        assert report["kept"] == 2 and not report["rejected"], name


def test_book_level_summaries_become_references(tmp_path):
    books = [
        {"text": "A long book.", "summary": [{"source": "sparknotes", "summary_text": "Short."},
                                            {"source": "gradesaver", "text": "Brief."}]},
        {"text": "Another book.", "summary": json.dumps(["One.", "Two."])},
        {"text": "Third book.", "summary": "Plain."},
    ]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in books))
    rows, _ = read_booksum([tmp_path / "b.jsonl"])
    assert [r["references"] for r in rows] == [["Short.", "Brief."], ["One.", "Two."], ["Plain."]]
    assert [r["id"] for r in rows] == ["b.jsonl:1", "b.jsonl:2", "b.jsonl:3"]


def test_bad_records_are_reported_with_file_line_and_skipped(tmp_path):
    f = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(CHAPTERS[0]).encode(),
        b"{not json",
        json.dumps({"chapter": "", "summary_text": "x"}).encode(),
        json.dumps({"text": "t", "summary": 5}).encode(),
        json.dumps({"title": "no schema"}).encode(),
        b'{"chapter": "caf\xe9", "summary_text": "x"}',
        json.dumps({"chapter": 3, "summary_text": "x"}).encode(),
        json.dumps(CHAPTERS[0]).encode(),
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    report = prepare_booksum([f], tmp_path / "out")
    reasons = {r["where"].rsplit(":", 1)[1]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"2", "3", "4", "5", "6", "7"}
    assert "invalid JSON" in reasons["2"] and "'chapter' missing, empty" in reasons["3"]
    assert "'summary'" in reasons["4"] and "no chapter/summary_text" in reasons["5"]
    assert "invalid UTF-8" in reasons["6"] and "not a string" in reasons["7"]
    assert report["read"] == 8 and report["kept"] == 2
    data = load_booksum(tmp_path / "out")
    assert data["id"] == ["emma/chapter 1/cliffnotes", "emma/chapter 1/cliffnotes#2"]  # ids stay unique
    assert json.loads((tmp_path / "out/report.json").read_text()) == report


def test_nothing_usable_or_missing_input_fails_without_output(tmp_path):
    (tmp_path / "empty.jsonl").write_text("{}\n")
    with pytest.raises(LongcptError, match="no usable BookSum record"):
        prepare_booksum([tmp_path / "empty.jsonl"], tmp_path / "out")
    with pytest.raises(LongcptError, match="not found: .*nope.jsonl"):
        prepare_booksum([tmp_path / "nope.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompt_template_and_truncation():
    tok = bpe_tokenizer()
    text = "The grass is green. " * 50
    ids, cut = booksum_prompt_ids(tok, text)
    assert not cut and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == INSTRUCTION + text + SUMMARY_CUE
    short, cut = booksum_prompt_ids(tok, text, max_tokens=60)
    assert cut and len(short) == 60 and short[-len(tok.encode(SUMMARY_CUE)):] == tok.encode(SUMMARY_CUE)


def test_pairs_fit_seq_len_with_loss_on_the_summary_only(tmp_path):
    tok = bpe_tokenizer()
    books = [{"chapter": "The sky is blue. " * 200, "summary_text": "Blue sky, told at length. " * 40},
             {"chapter": "Here we go.", "summary_text": "A short one."}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in books))
    prepare_booksum([tmp_path / "c.jsonl"], tmp_path / "p")
    pairs = read_booksum_pairs(str(tmp_path / "p"), 256, tok)
    (long_prompt, long_target), (prompt, target) = pairs
    assert len(long_prompt) + len(long_target) == 256 and len(long_target) == 128  # summary keeps half
    assert long_target[-1] != tok.eos_token_id  # a cut summary does not end
    assert target[-1] == tok.eos_token_id
    assert tok.decode(target, skip_special_tokens=True) == " A short one."
    row = answer_only_row(prompt, target, 256, tok.pad_token_id)
    labelled = [y for y in row["labels"] if y != -100]
    assert labelled == target


def test_prepare_booksum_script(tmp_path, run_script):
    (tmp_path / "x1.jsonl").write_text(json.dumps(CHAPTERS[0]) + "\n")
    (tmp_path / "x2.jsonl").write_text(json.dumps(CHAPTERS[1]) + "\nnot json\n")
    res = run_script(REPO / "data_prep/prepare_booksum.py", "--input", tmp_path / "x*.jsonl", "--output", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    assert "kept 2, rejected 1" in res.stdout and "x2.jsonl:2" in res.stdout
    assert len(load_booksum(tmp_path / "o")) == 2
