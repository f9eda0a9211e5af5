"""`longcpt eval passkey --attention infllm`: options and kv_kept recorded, the key's visibility and the
attention it receives logged."""

from __future__ import annotations

import json

import pytest

from longcpt.cli import main
from longcpt.data.passkey import PasskeyPromptBuilder
from longcpt.model.generation import attention_on, visible_share

pytestmark = pytest.mark.usefixtures("one_thread")  # many small steps

OPTIONS = {"n_init": 4, "n_local": 128, "block_size": 16, "topk": 2, "repr_topk": 2, "exc_block_size": 32,
           "max_cached_block": 2}


def test_passkey_with_infllm_records_options_kv_kept_and_key_visibility(model_dir, tokenizer, tmp_path):
    lo = PasskeyPromptBuilder(tokenizer).min_length + 5
    out = tmp_path / "pk"
    code = main(["eval", "passkey", "--model", str(model_dir), "--lengths", f"{lo},{4 * lo}", "--depths", "0,1",
                 "--trials", "2", "--output", str(out), "--prefill-chunk", "48", "--attention", "infllm",
                 "--attention-options", json.dumps({k: v for k, v in OPTIONS.items() if k != "n_init"})])
    assert code == 0
    report = json.loads((out / "passkey.json").read_text())
    assert report["attention"] == "infllm"
    assert report["attention_options"] == {**OPTIONS, "n_init": 128, "repr_dtype": "float32"}  # defaults filled in
    assert 0.0 < report["kv_kept"] < 1.0
    for r in report["results"]:
        assert 0.0 <= r["key_visible"] <= 1.0 and 0.0 <= r["key_attention"] < 1.0
    # at depth 1 the needle (60 tokens here) sits right before the question (38): inside the window
    assert all(s["key_visible"] == 1.0 and s["key_attention"] > 0 for s in report["samples"] if s["depth"] == 1.0)
    far = [s for s in report["samples"] if s["length"] == 4 * lo and s["depth"] == 0.0]
    assert all(s["key_visible"] < 1.0 for s in far)  # at 4x the length some steps miss the key's block


def test_visible_share_and_attention_are_none_for_kinds_that_see_everything():
    assert visible_share({0: object()}, 0, [3, 4], 5) is None and attention_on({0: object()}, 0, [3, 4]) is None


def test_key_positions_are_the_digits_of_the_key(tokenizer):
    for split in (False, True):
        builder = PasskeyPromptBuilder(tokenizer, split_digits=split)
        ex = builder.build(builder.min_length + 40, 0.5, 90817)
        digits = "".join(tokenizer.decode([ex.input_ids[i]]) for i in builder.key_positions(ex)).replace(" ", "")
        assert digits == "9081790817"
        assert all(ex.needle_start <= i < ex.needle_start + builder.needle_length(ex.key)
                   for i in builder.key_positions(ex))
