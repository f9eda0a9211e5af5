"""Evaluations run any evicting kind by `--attention` and record the share of the cache it kept."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from longcpt.cli import main
from longcpt.data.passkey import PasskeyPromptBuilder


def test_passkey_records_kind_options_and_kv_kept(model_dir, tokenizer, tmp_path):
    length = PasskeyPromptBuilder(tokenizer).min_length + 40
    out = tmp_path / "pk"
    assert main(["eval", "passkey", "--model", str(model_dir), "--lengths", str(length), "--depths", "0.5",
                 "--trials", "2", "--output", str(out), "--attention", "streaming",
                 "--attention-options", '{"cache_size": 24, "update_every": 16}']) == 0
    report = json.loads((out / "passkey.json").read_text())
    assert report["attention"] == "streaming"
    assert report["attention_options"] == {"cache_size": 24, "sinks": 4, "update_every": 16}
    # after the last update 24 tokens were kept, and fewer than 16 came after it, of >= length seen
    assert 0 < report["kv_kept"] < (24 + 16) / length
    # the largest cache: 24 kept + 16 new just before an update, of length + (fewer than 16) answer tokens
    assert report["kv_kept"] < report["kv_kept_mean"] < 1 and 40 / (length + 16) < report["kv_peak"] <= 40 / length


def test_ppl_records_kv_kept(model_dir, tmp_path):
    docs = [torch.randint(3, 200, (300,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    Dataset.from_dict({"input_ids": docs}).save_to_disk(str(tmp_path / "corpus"))
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(tmp_path / "corpus"), "--seq-len", "120",
                 "--output", str(out), "--attention", "h2o", "--attention-options",
                 '{"cache_size": 32, "update_every": 32}']) == 0
    report = json.loads((out / "ppl.json").read_text())
    # evictions after 32, 64 and 96 tokens: 32 kept + the 24 after the last one, of 120
    assert report["kv_kept"] == pytest.approx(56 / 120)
    # through the text: the slots each token saw (1..32, twice 33..64, then 33..56) against the full
    # cache's (1..120), and the largest cache, 64 just before an eviction
    seen = sum(range(1, 33)) + 2 * sum(range(33, 65)) + sum(range(33, 57))
    assert report["kv_kept_mean"] == pytest.approx(seen / sum(range(1, 121)))
    assert report["kv_peak"] == pytest.approx(64 / 120)
    assert report["attention"] == "h2o" and report["attention_options"]["recent"] is None


def test_bad_cache_size_is_one_clear_error(model_dir, tmp_path, capsys):
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(tmp_path), "--seq-len", "128",
                 "--output", str(tmp_path / "o"), "--attention", "h2o", "--attention-options", '{"cache_size": 0}']) == 2
    err = capsys.readouterr().err
    assert "--attention-options cache_size=0: must be a positive integer (kind 'h2o')" in err
