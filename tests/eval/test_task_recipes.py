"""The task recipes load and validate, and their DataModules give answer-only batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcpt.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,task", [("passkey_ft", "passkey"), ("booksum_ft", "booksum")])
def test_task_recipe_validates(name, task):
    cfg = load_config(REPO / "recipes" / f"{name}.yaml")
    assert cfg.data.task == task
    assert cfg.model.pretrained


def test_passkey_datamodule_batches(tmp_path, tokenizer):
    from longcpt.data.passkey import build_passkey_datamodule, make_passkey_examples

    rows = list(make_passkey_examples(tokenizer, [300], ["random"], n=6, seed=0))
    (tmp_path / "pk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(REPO / "recipes/passkey_ft.yaml", [
        f"data.train={tmp_path / 'pk.jsonl'}", "data.seq_len=320", "data.micro_batch_size=2",
        "data.num_workers=0", "attention.kind=anchor",
    ])
    dm = build_passkey_datamodule(cfg, tokenizer)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    b = batches[0]
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (2, 320)
    assert b["cu_seqlens"].tolist()[-1] == 640
    keys = {r["key"] for r in rows}
    for row_labels in b["labels"]:
        supervised = row_labels.ne(-100).nonzero().flatten().tolist()
        assert supervised[0] == 299  # the last prompt token predicts the first answer token
        answer = row_labels[supervised].tolist()
        assert int(tokenizer.decode(answer, skip_special_tokens=True)) in keys
        assert answer[-1] == tokenizer.eos_token_id
    assert dm.val_dataloader() == []
