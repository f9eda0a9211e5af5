"""`longcpt eval ppl`: per-position perplexity equal to transformers' losses, outputs, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny import tiny_llama

from longcpt.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six documents of token ids (two too short), saved like prepare_corpus output."""
    g = torch.Generator().manual_seed(0)
    lengths = [300, 40, 260, 500, 10, 280]
    docs = [torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]
    path = tmp_path_factory.mktemp("corpus") / "prepared"
    Dataset.from_dict({"input_ids": docs}).save_to_disk(str(path))
    return path, docs


def test_bucket_ppl_equals_transformers_losses(corpus, model_dir, tmp_path):
    path, docs = corpus
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(path), "--seq-len", "256",
                 "--bucket", "64", "--max-docs", "3", "--chunk", "50", "--output", str(out)]) == 0
    report = json.loads((out / "ppl.json").read_text())

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    long_docs = [d for d in docs if len(d) >= 255][:3]  # BOS + 255 tokens
    ids = torch.tensor([[1] + d[:255] for d in long_docs])
    with torch.no_grad():
        logits = hf(ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.view(3, 255)  # nll[:, p-1] = loss of target position p
    expected = []
    for start in range(0, 256, 64):
        positions = range(max(start, 1), start + 64)
        values = nll[:, [p - 1 for p in positions]]
        expected.append(math.exp(values.double().mean().item()))
    assert [b["start"] for b in report["buckets"]] == [0, 64, 128, 192]
    assert [b["end"] for b in report["buckets"]] == [64, 128, 192, 256]
    assert [b["tokens"] for b in report["buckets"]] == [63 * 3, 64 * 3, 64 * 3, 64 * 3]
    assert [b["ppl"] for b in report["buckets"]] == pytest.approx(expected, rel=1e-5)
    assert report["ppl"] == pytest.approx(math.exp(nll.double().mean().item()), rel=1e-5)
    assert report["n_docs"] == 3
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_jsonl_text_input(model_dir, tokenizer, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "The grass is green. The sky is blue. " * 40}) + "\n")
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(f), "--seq-len", "100",
                 "--output", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o/ppl.json").read_text())
    assert len(report["buckets"]) == 8 and report["n_docs"] == 1


def test_no_long_document_names_the_longest(corpus, model_dir, tmp_path, capsys):
    path, docs = corpus
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(path), "--seq-len", "2000",
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no document has 1999 tokens (the longest has 500)" in err and "--seq-len" in err
    assert not (tmp_path / "o").exists()


def test_random_model_is_not_a_trivial_reference():
    """Guard for the reference test above: the tiny model's losses vary with position and input."""
    hf = tiny_llama(vocab_size=50)
    ids = torch.randint(0, 50, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = F.cross_entropy(hf(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    assert loss.std() > 0.1


def test_an_interrupted_run_resumes_with_the_same_figures(corpus, model_dir, tmp_path, monkeypatch):
    import longcpt.eval.ppl as ppl_eval

    path, _ = corpus
    args = ["eval", "ppl", "--model", str(model_dir), "--data", str(path), "--seq-len", "256", "--bucket", "64",
            "--max-docs", "3", "--chunk", "50"]
    assert main([*args, "--output", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "ppl.json").read_text())
    real, read = ppl_eval.token_losses, []

    def crash_on_second(*a, **kw):
        read.append(1)
        if len(read) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ppl_eval, "token_losses", crash_on_second)
    assert main([*args, "--output", str(tmp_path / "cut")]) == 130
    read.clear()
    monkeypatch.setattr(ppl_eval, "token_losses", lambda *a, **kw: read.append(1) or real(*a, **kw))
    assert main([*args, "--output", str(tmp_path / "cut")]) == 0
    assert len(read) == 2  # the first document was not read again
    resumed = json.loads((tmp_path / "cut" / "ppl.json").read_text())
    assert resumed["ppl"] == pytest.approx(whole["ppl"], rel=1e-12)
    assert [b["ppl"] for b in resumed["buckets"]] == pytest.approx([b["ppl"] for b in whole["buckets"]], rel=1e-12)
    assert main([*args[:-4], "--bucket", "32", "--max-docs", "3", "--chunk", "50", "--output", str(tmp_path / "cut")]) == 2
