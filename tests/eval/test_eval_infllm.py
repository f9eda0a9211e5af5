"""`longcpt eval passkey --attention infllm`: options and kv_kept recorded, needle visibility logged."""

from __future__ import annotations

import json

import pytest

from longcpt.cli import main
from longcpt.data.passkey import PasskeyPromptBuilder
from longcpt.model.generation import visible_share

pytestmark = pytest.mark.usefixtures("one_thread")  # many small steps

OPTIONS = {"n_init": 4, "n_local": 128, "block_size": 16, "topk": 2, "repr_topk": 2, "exc_block_size": 32,
           "max_cached_block": 2}


def test_passkey_with_infllm_records_options_kv_kept_and_needle_visibility(model_dir, tokenizer, tmp_path):
    lo = PasskeyPromptBuilder(tokenizer).min_length + 5
    out = tmp_path / "pk"
    code = main(["eval", "passkey", "--model", str(model_dir), "--lengths", f"{lo},{4 * lo}", "--depths", "0,1",
                 "--trials", "2", "--output", str(out), "--prefill-chunk", "48", "--attention", "infllm",
                 "--attention-options", json.dumps({k: v for k, v in OPTIONS.items() if k != "n_init"})])
    assert code == 0
    report = json.loads((out / "passkey.json").read_text())
    assert report["attention"] == "infllm"
    assert report["attention_options"] == {**OPTIONS, "n_init": 128}  # resolved: the default filled in
    assert 0.0 < report["kv_kept"] < 1.0
    for r in report["results"]:
        assert 0.0 <= r["needle_visible"] <= 1.0
    # at depth 1 the needle (60 tokens here) sits right before the question (38): inside the window
    assert all(s["needle_visible"] == 1.0 for s in report["samples"] if s["depth"] == 1.0)


def test_visible_share_is_none_for_kinds_that_see_everything():
    assert visible_share({0: object()}, 0, 0, 10, 5) is None
