"""`longcpt eval ruler`: the scorer, planted answers (an oracle scores 100, silence 0), resume, outputs."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

import longcpt.eval.ruler as ruler_eval
from longcpt.cli import main
from longcpt.data.ruler import TASKS, RulerGenerator
from longcpt.data.ruler import TASKS as RULER_TASKS
from longcpt.errors import LongcptError
from longcpt.eval.ruler import clean_prediction, evaluate_ruler, string_match_all, task_score


def test_string_match_all_by_hand():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("only 123 here", ["123", "456"]) == 0.5
    assert string_match_all("BRAVE-HARBOR", ["brave-harbor"]) == 1.0  # case-insensitive
    assert string_match_all("", ["a", "b", "c", "d"]) == 0.0
    assert string_match_all("1234567", ["123"]) == 1.0  # substring, as RULER scores
    # RULER's task score: mean over samples x 100 -> (1 + 0.5 + 0) / 3 * 100
    assert task_score(["123 456", "123", "x"], [["123", "456"], ["123", "456"], ["9"]]) == pytest.approx(50.0)
    assert task_score([], []) == 0.0
    assert clean_prediction("  a\tb\x00c \n") == "a\nb\nc"


def task_of(prompt: str) -> str:
    if "track the chain(s) of variable assignment" in prompt:
        return "vt"
    if "numbered list of words" in prompt:
        return "cwe"
    if "coded text" in prompt:
        return "fwe"
    return "niah"


def solve(prompt: str) -> str:
    """An oracle that reads the prompt like a perfect model would (never the references)."""
    task, question = task_of(prompt), prompt[prompt.rindex("\n") :]
    if task == "niah":
        query = re.search(r"for (.+?) mentioned in the provided text\?", question).group(1)
        keys = re.split(r", and |, ", query)
        needles = re.findall(r"special magic \w+ for ([\w-]+) is: ([\w-]+)\.", prompt)
        return " " + ", ".join(v for k in keys for kk, v in needles if kk == k) + "."
    if task == "vt":
        bound = [re.search(r"assigned the value (\d+) in the text above", question).group(1)]
        for name, source in re.findall(r"VAR ([A-Z]+) = (?:VAR )?([A-Z]+|\d+)\.", prompt):
            if source in bound:
                bound.append(name)
        return ", ".join(bound[1:])
    body = prompt[: prompt.rindex("\nQuestion:")]
    if task == "cwe":
        words = re.findall(r"\d+\. ([a-z]+)", body[body.index("most often.\n") :])
        return " " + " ".join(w for w, _ in Counter(words).most_common(10))
    words = [w for w in body[body.index("coded words.") + 12 :].split() if w != "..."]
    return " " + ", ".join(w for w, _ in Counter(words).most_common(3))


def fake_model(tokenizer, answer):
    """A stand-in for `generate` that answers `answer(prompt_text)` for each row, counting the rows."""

    def fake_generate(model, ids, max_new_tokens, **kwargs):
        rows = [tokenizer.encode(answer(tokenizer.decode(row, skip_special_tokens=True)),
                                 add_special_tokens=False)[:max_new_tokens] for row in ids.tolist()]
        width = max(1, max(map(len, rows)))
        fake_generate.calls += len(rows)
        return torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])

    fake_generate.calls = 0
    return fake_generate


def _settings(**extra):
    return {"model": "m", "haystack": "noise", "seed": 0, "rope_scaling": None, "attention": "full",
            "attention_options": {}, **extra}


def test_planted_answers_score_100_and_silence_scores_0(monkeypatch, tokenizer, tmp_path):
    """An oracle that solves each prompt from its text scores 100 on every task; an empty answer 0."""
    gen = RulerGenerator(tokenizer)
    lengths = [max(gen.min_length(t) for t in TASKS) + 20, 1600]
    monkeypatch.setattr(ruler_eval, "generate", fake_model(tokenizer, solve))
    report = evaluate_ruler(None, tokenizer, gen, list(TASKS), lengths, 2, tmp_path / "oracle", _settings())
    assert {(r["task"], r["length"]): r["score"] for r in report["results"]} == {
        (t, n): 100.0 for t in TASKS for n in lengths}
    assert report["average"] == {str(n): 100.0 for n in lengths}
    assert all(r["n"] == 2 for r in report["results"])

    monkeypatch.setattr(ruler_eval, "generate", fake_model(tokenizer, lambda text: ""))
    report = evaluate_ruler(None, tokenizer, gen, list(TASKS), lengths, 2, tmp_path / "silent", _settings())
    assert all(r["score"] == 0.0 for r in report["results"]) and set(report["average"].values()) == {0.0}


def test_half_right_answers_score_by_share_of_references(monkeypatch, tokenizer, tmp_path):
    """multivalue: naming 2 of the 4 values scores 50, as string_match_all counts them."""
    gen = RulerGenerator(tokenizer)

    def half(text):
        return ", ".join(solve(text).strip(" .").split(", ")[:2])

    monkeypatch.setattr(ruler_eval, "generate", fake_model(tokenizer, half))
    report = evaluate_ruler(None, tokenizer, gen, ["niah_multivalue"], [900], 3, tmp_path / "o", _settings())
    assert report["results"] == [{"task": "niah_multivalue", "length": 900, "score": 50.0, "n": 3}]


def test_predictions_file_resumes_and_extends(monkeypatch, tokenizer, tmp_path):
    gen = RulerGenerator(tokenizer)
    out = tmp_path / "o"
    oracle = fake_model(tokenizer, solve)
    monkeypatch.setattr(ruler_eval, "generate", oracle)
    evaluate_ruler(None, tokenizer, gen, ["niah_single", "vt"], [600], 3, out, _settings(), batch_tokens=600)
    assert oracle.calls == 6
    lines = (out / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["task"], r["length"], r["index"]) for r in rows] == [
        (t, 600, i) for t in ("niah_single", "vt") for i in range(3)]
    assert all(set(r) >= {"task", "length", "index", "prompt_tokens", "prediction", "references"} for r in rows)
    assert all(r["prompt_tokens"] == 600 for r in rows)
    # A crash in the middle of writing the last row, then the same command with one more sample.
    (out / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    oracle.calls = 0
    report = evaluate_ruler(None, tokenizer, gen, ["niah_single", "vt"], [600], 4, out, _settings())
    assert oracle.calls == 3  # the cut row and the two new samples only
    assert [r["score"] for r in report["results"]] == [100.0, 100.0] and report["generated"] == 3
    with pytest.raises(LongcptError, match=r"other settings \(seed: 0 -> 1\)"):
        evaluate_ruler(None, tokenizer, gen, ["vt"], [600], 1, out, _settings(seed=1))


def test_cli_writes_spec_outputs(model_dir, tokenizer, tmp_path, one_thread):
    """A real tiny model end to end: ruler.json, predictions.jsonl and ruler.png as docs/reference.md fixes them."""
    out = tmp_path / "r"
    length = RulerGenerator(tokenizer).min_length("niah_multikey") + 10
    code = main(["eval", "ruler", "--model", str(model_dir), "--lengths", f"{length},{length + 64}",
                 "--tasks", "niah_single,niah_multikey", "--samples", "1", "--output", str(out),
                 "--prefill-chunk", "128"])
    assert code == 0
    report = json.loads((out / "ruler.json").read_text())
    assert [(r["task"], r["length"], r["n"]) for r in report["results"]] == [
        (t, n, 1) for t in ("niah_single", "niah_multikey") for n in (length, length + 64)]
    assert all(set(r) == {"task", "length", "score", "n"} and 0 <= r["score"] <= 100 for r in report["results"])
    assert set(report["average"]) == {str(length), str(length + 64)}
    assert report["attention"] == "full" and report["kv_kept"] is None and report["haystack"] == "noise"
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["references"]) == 1 for r in rows)
    assert (out / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_greedy_prediction_is_transformers_greedy_continuation(model_dir, tokenizer, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from longcpt.model import from_pretrained

    gen = RulerGenerator(tokenizer)
    sample = gen.sample("vt", gen.min_length("vt") + 30, 0)
    evaluate_ruler(from_pretrained(model_dir).eval(), tokenizer, gen, ["vt"], [sample.length], 1, tmp_path / "o",
                   _settings(), prefill_chunk=64)
    row = json.loads((tmp_path / "o" / "predictions.jsonl").read_text())
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([sample.input_ids])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=sample.max_new_tokens,
                           pad_token_id=0, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1] :]
    assert row["prediction"] == clean_prediction(tokenizer.decode(expected, skip_special_tokens=True))


def test_bad_arguments_are_one_message_and_write_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "x"
    base = ["eval", "ruler", "--model", str(model_dir), "--output", str(out)]
    assert main([*base, "--tasks", "niah_single,qa_1", "--lengths", "2000"]) == 2
    assert "--tasks qa_1: unknown task; known tasks: niah_single," in capsys.readouterr().err
    assert main([*base, "--tasks", "niah_single,cwe", "--lengths", "100,5000"]) == 2
    err = capsys.readouterr().err
    assert "--lengths 100: too short for niah_single" in err and "--lengths 100: too short for cwe" in err
    assert "5000" not in err and not out.exists()


def test_cli_task_list_is_the_generators():
    assert tuple(RULER_TASKS) == tuple(TASKS)
