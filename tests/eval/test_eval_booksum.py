"""`longcpt eval booksum`: ROUGE equal to rouge-score's, resumable predictions, the documented outputs."""

from __future__ import annotations

import json
import statistics

import pytest
from rouge_score import rouge_scorer

import longcpt.eval.booksum as booksum_eval
from longcpt.cli import main
from longcpt.data.booksum import load_booksum, prepare_booksum
from longcpt.errors import LongcptError
from longcpt.eval.booksum import evaluate_booksum, rouge_scores
from longcpt.eval.predictions import read_rows

PREDICTIONS = [
    "The hero leaves home. He travels far and finds the ring.",
    "Nothing happens in this chapter",
    "Elizabeth meets Darcy at the ball! She dislikes him.",
]
REFERENCES = [
    ["The hero left his home and travelled far. He found a ring."],
    ["In this chapter the family moves to London.", "The family moves; nothing else happens."],
    ["At the ball, Elizabeth meets Mr. Darcy. She finds him proud and dislikes him?"],
]


def test_rouge_equals_rouge_score_on_a_fixture():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for pred, refs in zip(PREDICTIONS, REFERENCES):
        # rougeLsum needs one sentence per line; written out by hand here.
        pred_lines = pred.replace(". ", ".\n").replace("! ", "!\n")
        ref_lines = [r.replace(". ", ".\n").replace("; ", "; ") for r in refs]
        best = {k: max(scorer.score(r, pred_lines)[k].fmeasure for r in ref_lines) for k in expected}
        for k in expected:
            expected[k] += 100 * best[k] / len(PREDICTIONS)
    got = rouge_scores(PREDICTIONS, REFERENCES)
    for k in expected:
        assert got[k] == pytest.approx(expected[k], abs=1e-9), k
    assert got["overall"] == pytest.approx(statistics.geometric_mean([expected["rouge1"], expected["rouge2"],
                                                                      expected["rougeL"]]))
    assert got["n"] == 3
    assert 0 < got["rouge2"] < got["rouge1"] < 100


def test_rouge_uses_stemming():
    stemmed = rouge_scores(["the heroes travelled"], [["the hero travels"]])
    assert stemmed["rouge1"] == pytest.approx(100.0)


@pytest.fixture()
def prepared(tmp_path):
    rows = [{"id": f"ch{i}", "chapter": f"Chapter {i}. The grass is green and the sky is blue. " * (3 + i),
             "summary_text": f"Chapter {i} is about green grass."} for i in range(4)]
    src = tmp_path / "chapters.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_booksum([src], tmp_path / "prepared")
    return tmp_path / "prepared"


def _settings(**kw):
    base = {"model": "m", "data": "d", "max_input_tokens": 200, "max_new_tokens": 6, "temperature": 0.0,
            "top_p": 1.0, "seed": 0, "limit": None}
    return {**base, **kw}


def test_interrupted_evaluation_resumes_where_it_stopped(prepared, model_dir, tokenizer, tmp_path, monkeypatch):
    from longcpt.model import from_pretrained

    model = from_pretrained(model_dir).eval()
    data = load_booksum(prepared)
    full = evaluate_booksum(model, tokenizer, data, tmp_path / "ref", _settings())
    reference_rows = [json.loads(x) for x in (tmp_path / "ref/predictions.jsonl").read_text().splitlines()]

    calls = {"n": 0}
    real_generate = booksum_eval.generate

    def crashing_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user stops the run during the third example
        return real_generate(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(booksum_eval, "generate", crashing_generate)
    with pytest.raises(KeyboardInterrupt):
        evaluate_booksum(model, tokenizer, data, out, _settings())
    assert not (out / "rouge.json").exists()
    assert [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()] == ["ch0", "ch1"]
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"id": "ch2", "predic')  # a line cut by a crash

    seen = []

    def counting_generate(*args, **kwargs):
        seen.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(booksum_eval, "generate", counting_generate)
    resumed = evaluate_booksum(model, tokenizer, data, out, _settings())
    assert len(seen) == 2  # only ch2 and ch3 were generated again
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows == reference_rows
    timing = ("seconds", "tokens_per_second", "generated")  # this run's own: only 2 examples were generated
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in full.items() if k not in timing}
    assert (resumed["generated"], full["generated"]) == (2, 4)


def test_resume_with_other_settings_is_refused(prepared, model_dir, tokenizer, tmp_path):
    from longcpt.model import from_pretrained

    model = from_pretrained(model_dir).eval()
    data = load_booksum(prepared)
    evaluate_booksum(model, tokenizer, data, tmp_path / "o", _settings(limit=1))
    with pytest.raises(LongcptError, match=r"max_new_tokens: 6 -> 9"):
        evaluate_booksum(model, tokenizer, data, tmp_path / "o", _settings(limit=1, max_new_tokens=9))


def test_read_predictions_rejects_foreign_files(tmp_path):
    f = tmp_path / "predictions.jsonl"
    f.write_text('{"id": "a", "prediction": "x"}\n[1, 2]\n')
    with pytest.raises(LongcptError, match=r"predictions.jsonl:2: not a prediction row"):
        read_rows(f, key=lambda row: row["id"], command="longcpt eval booksum")


def test_cli_writes_spec_outputs(prepared, model_dir, tmp_path, capsys):
    out = tmp_path / "bs"
    args = ["eval", "booksum", "--model", str(model_dir), "--data", str(prepared), "--output", str(out),
            "--max-input-tokens", "100", "--max-new-tokens", "5", "--limit", "3", "--prefill-chunk", "32"]
    assert main(args) == 0
    rouge = json.loads((out / "rouge.json").read_text())
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "overall", "n"} <= set(rouge) and rouge["n"] == 3
    assert rouge["attention"] == "full" and rouge["attention_options"] == {} and rouge["kv_kept"] is None
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ch0", "ch1", "ch2"]
    assert all({"id", "prediction", "reference"} <= set(r) for r in rows)
    assert all(r["input_tokens"] <= 100 for r in rows) and rows[2]["truncated"]
    # Sampling is reproducible per example.
    sample = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]
    assert main(args[:-8] + ["--output", str(tmp_path / "s1"), "--max-new-tokens", "5", "--limit", "2"] + sample) == 0
    assert main(args[:-8] + ["--output", str(tmp_path / "s2"), "--max-new-tokens", "5", "--limit", "2"] + sample) == 0
    assert (tmp_path / "s1/predictions.jsonl").read_text() == (tmp_path / "s2/predictions.jsonl").read_text()


def test_cli_bad_flags_one_message(prepared, model_dir, tmp_path, capsys):
    code = main(["eval", "booksum", "--model", str(model_dir), "--data", str(tmp_path / "missing"),
                 "--output", str(tmp_path / "o"), "--top-p", "0"])
    assert code == 2
    assert "--top-p 0.0: must be in (0, 1]" in capsys.readouterr().err
    code = main(["eval", "booksum", "--model", str(model_dir), "--data", str(tmp_path / "missing"),
                 "--output", str(tmp_path / "o")])
    assert code == 2
    assert "not a prepared BookSum folder" in capsys.readouterr().err
