"""`longcpt eval passkey`: scoring, the documented output files, errors."""

from __future__ import annotations

import json

import torch

import longcpt.eval.passkey as passkey_eval
from longcpt.cli import main
from longcpt.data.passkey import NEEDLE, PasskeyPromptBuilder
from longcpt.eval.passkey import evaluate_passkey, first_integer


def test_first_integer():
    assert first_integer(" 12345. Remember") == 12345
    assert first_integer("is 0042 and 7") == 42
    assert first_integer("no digits") is None


def _window_oracle(tokenizer, window: int):
    """A stand-in for `generate` that answers with the key iff the needle lies in the last `window` tokens."""

    def fake_generate(model, ids, max_new_tokens, **kwargs):
        rows = []
        for row in ids.tolist():
            text = tokenizer.decode(row[-window:])
            key = next((k for k in text.split() if k.isdigit() and NEEDLE.format(key=k) in text), "99")
            rows.append(tokenizer.encode(f" {key}.", add_special_tokens=False)[:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])

    return fake_generate


def test_scores_land_in_the_right_cells(monkeypatch, tokenizer):
    """An oracle that sees only the end of the prompt: right at depth 1, wrong at depth 0 when long."""
    monkeypatch.setattr(passkey_eval, "generate", _window_oracle(tokenizer, window=150))
    lo = PasskeyPromptBuilder(tokenizer).min_length + 10
    lengths, depths = [lo, lo + 600], [0.0, 1.0]
    report = evaluate_passkey(None, tokenizer, lengths, depths, trials=3, seed=1)
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in report["results"]}
    assert acc == {(lo, 0.0): 1.0, (lo, 1.0): 1.0, (lo + 600, 0.0): 0.0, (lo + 600, 1.0): 1.0}
    assert all(r["trials"] == 3 for r in report["results"])
    assert report["by_length"] == {str(lo): 1.0, str(lo + 600): 0.5}
    assert len(report["samples"]) == 12 and len({s["key"] for s in report["samples"]}) >= 10


def test_cli_writes_spec_outputs(model_dir, tokenizer, tmp_path, capsys):
    lo = PasskeyPromptBuilder(tokenizer).min_length + 5
    out = tmp_path / "pk"
    code = main(["eval", "passkey", "--model", str(model_dir), "--lengths", f"{lo},{2 * lo}",
                 "--depths", "0,0.5,1", "--trials", "2", "--output", str(out), "--prefill-chunk", "64"])
    assert code == 0
    report = json.loads((out / "passkey.json").read_text())
    assert [(r["length"], r["depth"]) for r in report["results"]] == [
        (n, d) for n in (lo, 2 * lo) for d in (0.0, 0.5, 1.0)
    ]
    for r in report["results"]:
        assert set(r) == {"length", "depth", "accuracy", "trials"} and 0.0 <= r["accuracy"] <= 1.0
    assert report["model"] == str(model_dir) and report["rope_scaling"] is None
    assert report["attention"] == "full" and report["attention_options"] == {} and report["kv_kept"] is None
    png = (out / "passkey.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_greedy_answers_match_transformers(model_dir, tokenizer):
    """The answer the evaluation reads equals transformers' greedy continuation of the same prompt."""
    from transformers import AutoModelForCausalLM

    from longcpt.model import from_pretrained

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = from_pretrained(model_dir).eval()
    lo = PasskeyPromptBuilder(tokenizer).min_length + 40
    report = evaluate_passkey(ours, tokenizer, [lo], [0.5], trials=2, seed=3, prefill_chunk=32)
    ex = PasskeyPromptBuilder(tokenizer).build(lo, 0.5, report["samples"][0]["key"])
    ids = torch.tensor([ex.input_ids])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=len(ex.answer_ids) + 3, pad_token_id=0)[0, lo:]
    assert report["samples"][0]["generated"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_bad_sweep_is_one_message(model_dir, tmp_path, capsys):
    code = main(["eval", "passkey", "--model", str(model_dir), "--lengths", "5,100000", "--depths", "0,1.5",
                 "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--lengths 5: too short" in err and "--depths 1.5" in err
    assert not (tmp_path / "x").exists()


def test_missing_model_folder(tmp_path, capsys):
    assert main(["eval", "passkey", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "nope: does not exist" in capsys.readouterr().err


def test_split_digits_prompts_are_scored_on_the_number(monkeypatch, tokenizer):
    """--split-digits: digit-by-digit answers decode to the number; the report records the setting."""
    monkeypatch.setattr(passkey_eval, "generate", _window_oracle(tokenizer, window=10**6))
    lo = PasskeyPromptBuilder(tokenizer, split_digits=True).min_length + 10
    report = evaluate_passkey(None, tokenizer, [lo], [0.0, 1.0], trials=2, seed=1, split_digits=True)
    assert report["split_digits"] is True and report["accuracy"] == 1.0


def test_rope_scaling_override_is_what_transformers_computes_with_it(model_dir, tmp_path):
    """`--rope-scaling` evaluates the folder as if its config.json carried that scaling."""
    import shutil

    from transformers import AutoModelForCausalLM

    from longcpt.eval.loading import load_model_and_tokenizer

    scaling = {"rope_type": "linear", "factor": 4.0}
    scaled, _ = load_model_and_tokenizer(model_dir, rope_scaling=scaling)
    plain, _ = load_model_and_tokenizer(model_dir)
    edited = tmp_path / "edited"
    shutil.copytree(model_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0)
    config["rope_parameters"] = {"rope_theta": theta, **scaling}
    config["rope_scaling"] = dict(scaling)
    (edited / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(edited).eval()

    ids = torch.randint(3, 60, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got, before = hf(ids).logits, scaled(ids), plain(ids)
    assert (got - expected).abs().max() <= 1e-5
    assert (before - expected).abs().max() > 1e-3  # the override changed the model


def test_bad_rope_scaling_is_one_message(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["eval", "passkey", "--model", str(model_dir), "--output", str(out),
                 "--rope-scaling", '{"rope_type": "yarn"}']) == 2
    assert "rope type 'yarn' needs factor" in capsys.readouterr().err and not out.exists()


def test_model_label_names_the_run_and_the_rope_override():
    from longcpt.eval.loading import model_label

    assert model_label("runs/passkey_ft/hf") == "passkey_ft/hf"
    assert model_label("runs/a/hf", None, "infllm") == "a/hf (infllm)"
    assert model_label("runs/a/hf", {"rope_type": "dynamic", "factor": 1.0}) == "a/hf, rope dynamic x1.0"


def test_attention_flags_are_checked_and_recorded(model_dir, tokenizer, tmp_path, capsys):
    lo = PasskeyPromptBuilder(tokenizer).min_length + 5
    base = ["eval", "passkey", "--model", str(model_dir), "--lengths", str(lo), "--depths", "0", "--trials", "1"]
    out = tmp_path / "o"
    assert main([*base, "--output", str(out), "--attention", "full", "--attention-options", '{"n_lcal": 4}']) == 2
    err = capsys.readouterr().err
    assert "--attention-options n_lcal: not an option of attention kind 'full'" in err and not out.exists()
    assert main([*base, "--output", str(out), "--attention", "sliding"]) == 2
    assert "attention kind 'sliding' is unknown; known kinds:" in capsys.readouterr().err
    assert main([*base, "--output", str(out), "--attention", "anchor", "--attention-options", '{"backend": "sdpa"}']) == 0
    report = json.loads((out / "passkey.json").read_text())
    assert report["attention"] == "anchor" and report["attention_options"] == {"backend": "sdpa"}


def test_an_interrupted_sweep_resumes_and_more_trials_add_only_the_missing(model_dir, tokenizer, tmp_path, monkeypatch):
    """Rows are appended as each batch finishes; the same command runs only what is missing and
    reports what an uninterrupted run reports (its timing aside)."""
    lo = PasskeyPromptBuilder(tokenizer).min_length + 5
    args = ["eval", "passkey", "--model", str(model_dir), "--lengths", f"{lo},{lo + 40}", "--depths", "0,1",
            "--trials", "2", "--prefill-chunk", "64"]
    assert main([*args, "--output", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "passkey.json").read_text())

    real, calls = passkey_eval.generate, []

    def crash_on_third_batch(*a, **kw):
        calls.append(a[1].shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(passkey_eval, "generate", crash_on_third_batch)
    assert main([*args, "--output", str(tmp_path / "cut")]) == 130
    assert len((tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()) == 4  # two cells of 2 trials
    calls.clear()
    monkeypatch.setattr(passkey_eval, "generate", lambda *a, **kw: calls.append(a[1].shape[0]) or real(*a, **kw))
    assert main([*args, "--output", str(tmp_path / "cut")]) == 0
    assert calls == [2, 2]  # only the two cells not done
    resumed = json.loads((tmp_path / "cut" / "passkey.json").read_text())
    timing = ("seconds", "tokens_per_second", "generated")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    calls.clear()
    assert main([*args[:-4], "--trials", "3", "--prefill-chunk", "64", "--output", str(tmp_path / "cut")]) == 0
    assert calls == [1, 1, 1, 1]  # one more trial per cell
    assert main([*args[:-2], "--prefill-chunk", "64", "--seed", "5", "--output", str(tmp_path / "cut")]) == 2
