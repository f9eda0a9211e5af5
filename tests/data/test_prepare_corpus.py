"""prepare_corpus: formats, bad records with file:line in report.json, atomic output, splits."""

import json
import textwrap
from pathlib import Path

import pytest

from longcpt.data.prepare import prepare_corpus
from longcpt.data.tokenizer import train_tokenizer
from longcpt.errors import LongcptError

REPO = Path(__file__).resolve().parents[2]
TEXTS = [
    "The grass is green. The sky is blue.",
    textwrap.dedent(json.__doc__ or "json module"),
    "Ünïcödé and 数据 survive byte-level BPE.",
    "short",
    "def f(x):\n    return x * 2\n" * 20,
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    src = root / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    train_tokenizer([src], 300, root / "tok")
    return root / "tok"


def reference_ids(tokenizer, texts):
    """Token ids by plain transformers, without special tokens (prepare adds none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def saved_ids(path):
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    assert ds.column_names == ["input_ids"]
    return ds.to_dict()["input_ids"]


def prepare(*args, **kw):
    return prepare_corpus(*args, progress=False, **kw)


def test_bad_jsonl_records_are_reported_with_file_line_and_skipped(tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"text": TEXTS[0]}).encode(),  # 1 ok
        b"{not json",  # 2
        json.dumps({"body": "x"}).encode(),  # 3 missing field
        json.dumps({"text": 42}).encode(),  # 4 not a string
        json.dumps({"text": "   "}).encode(),  # 5 empty
        b'{"text": "caf\xe9"}',  # 6 latin-1 byte: invalid UTF-8
        b"",  # 7 blank line: not a record
        json.dumps([1, 2]).encode(),  # 8 not an object
        json.dumps({"text": "bad \ud800 surrogate"}).encode(),  # 9 escaped lone surrogate
        json.dumps({"text": TEXTS[2]}).encode(),  # 10 ok
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    report = prepare([src], tokenizer, tmp_path / "out")
    assert (report["read"], report["kept"], report["rejected"]) == (9, 2, 7)
    got = {(r["location"], r["kind"]) for r in report["rejections"]}
    assert got == {(f"{src}:2", "invalid JSON"), (f"{src}:3", "missing field"), (f"{src}:4", "not a string"),
                   (f"{src}:5", "empty text"), (f"{src}:6", "invalid UTF-8"), (f"{src}:8", "not an object"),
                   (f"{src}:9", "invalid UTF-8")}
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk == report
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 7
    expected = reference_ids(tokenizer, [TEXTS[0], TEXTS[2]])
    assert saved_ids(tmp_path / "out") == expected
    assert report["tokens"] == sum(map(len, expected))


def test_json_parquet_txt_folders_and_globs(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    (raw / "docs").mkdir(parents=True)
    # .json array: element 2 lacks the field, element 3 has a non-UTF-8 byte
    (raw / "a.json").write_bytes(
        b'[\n  {"text": "' + TEXTS[0].encode() + b'"},\n  {"other": 1},\n  {"text": "x\xff"},\n'
        b'  {"text": "' + TEXTS[3].encode() + b'"}\n]\n'
    )
    pq.write_table(pa.table({"text": [TEXTS[1], None, "", TEXTS[2]]}), raw / "b.parquet")
    (raw / "docs" / "c.txt").write_text(TEXTS[4])
    (raw / "docs" / "d.txt").write_bytes(b"line one\nline \xfe two\n")
    report = prepare([raw / "*.json", raw / "b.parquet", raw / "docs"], tokenizer, tmp_path / "out")
    got = {(r["location"], r["kind"]) for r in report["rejections"]}
    assert got == {(f"{raw / 'a.json'}:3", "missing field"), (f"{raw / 'a.json'}:4", "invalid UTF-8"),
                   (f"{raw / 'b.parquet'}:2", "not a string"), (f"{raw / 'b.parquet'}:3", "empty text"),
                   (f"{raw / 'docs' / 'd.txt'}:2", "invalid UTF-8")}
    kept = [TEXTS[0], TEXTS[3], TEXTS[1], TEXTS[2], TEXTS[4]]  # argument order, then file order
    assert saved_ids(tmp_path / "out") == reference_ids(tokenizer, kept)
    assert report["inputs"] == [str(raw / "a.json"), str(raw / "b.parquet"), str(raw / "docs" / "c.txt"),
                                str(raw / "docs" / "d.txt")]


def test_broken_json_array_is_reported_not_fatal(tokenizer, tmp_path):
    src = tmp_path / "a.json"
    src.write_text('[{"text": "' + TEXTS[0] + '"},\n {"text": oops}\n]')
    report = prepare([src], tokenizer, tmp_path / "out")
    assert report["kept"] == 1 and report["rejections"][0]["location"] == f"{src}:2"


def test_missing_input_or_tokenizer_is_an_error_naming_it_and_writes_nothing(tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    with pytest.raises(LongcptError, match="absent.jsonl"):
        prepare([tmp_path / "absent.jsonl"], tokenizer, tmp_path / "out")
    with pytest.raises(LongcptError, match="no_such_tok"):
        prepare([src], tmp_path / "no_such_tok", tmp_path / "out")
    with pytest.raises(LongcptError, match="matches no"):
        prepare([str(tmp_path / "*.parquet")], tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_failed_run_leaves_the_previous_output_untouched(tokenizer, tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    bad.write_text('{"text": ""}\n')
    prepare([good], tokenizer, tmp_path / "out")
    before = saved_ids(tmp_path / "out")
    with pytest.raises(LongcptError, match="all 1 rejected"):
        prepare([bad], tokenizer, tmp_path / "out")
    assert saved_ids(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]  # no scratch left


def test_validation_split_is_disjoint_complete_and_seeded(tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    texts = [f"document number {i}: " + TEXTS[i % len(TEXTS)] for i in range(40)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    report = prepare([src], tokenizer, tmp_path / "out", val_fraction=0.1, seed=1)
    train, val = saved_ids(tmp_path / "out" / "train"), saved_ids(tmp_path / "out" / "val")
    assert len(val) == 4 and len(train) == 36
    ref = reference_ids(tokenizer, texts)
    assert sorted(map(tuple, train + val)) == sorted(map(tuple, ref))
    assert [d for d in ref if d in train] == train  # stored order kept
    assert report["splits"]["val"] == {"documents": 4, "tokens": sum(map(len, val))}
    prepare([src], tokenizer, tmp_path / "again", val_fraction=0.1, seed=1)
    assert saved_ids(tmp_path / "again" / "val") == val


@pytest.mark.slow
def test_num_proc_gives_the_same_data(tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"{i} " + TEXTS[i % 5]}) + "\n" for i in range(30)))
    prepare([src], tokenizer, tmp_path / "one", batch_size=4)
    prepare([src], tokenizer, tmp_path / "two", num_proc=2, batch_size=4)
    assert saved_ids(tmp_path / "one") == saved_ids(tmp_path / "two")


def test_cli_script(tokenizer, tmp_path, run_script):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": TEXTS[0]}) + "\n{bad\n")
    script = REPO / "data_prep" / "prepare_corpus.py"
    ok = run_script(script, "--input", src, "--tokenizer", tokenizer, "--output", tmp_path / "out")
    assert ok.returncode == 0, ok.stderr
    assert "kept 1, rejected 1" in ok.stdout and f"{src}:2" in ok.stdout
    bad = run_script(script, "--input", src, "--tokenizer", tmp_path / "none", "--output", tmp_path / "out2")
    assert bad.returncode == 2 and "none" in bad.stderr and "Traceback" not in bad.stderr


def test_text_spelling_a_special_token_is_not_encoded_as_one(tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "a page with <s> and </s> and <pad> in it"}) + "\n")
    prepare([src], tokenizer, tmp_path / "out")
    (ids,) = saved_ids(tmp_path / "out")
    assert not {0, 1, 2} & set(ids)  # no PAD/BOS/EOS id inside a document
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    assert tok.decode(ids) == "a page with <s> and </s> and <pad> in it"
