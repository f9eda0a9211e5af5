"""The task recipes load and validate, and their DataModules give answer-only batches."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from longcpt.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,task", [("passkey_ft", "passkey"), ("booksum_ft", "booksum")])
def test_task_recipe_validates(name, task):
    cfg = load_config(REPO / "recipes" / f"{name}.yaml")
    assert cfg.data.task == task
    assert cfg.model.pretrained


def _passkey_config(tmp_path, tokenizer, *extra):
    from longcpt.data.passkey import make_passkey_examples

    rows = list(make_passkey_examples(tokenizer, [300], ["random"], n=6, seed=0))
    (tmp_path / "pk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(REPO / "recipes/passkey_ft.yaml", [
        f"data.train={tmp_path / 'pk.jsonl'}", "data.seq_len=320", "data.micro_batch_size=2",
        "data.num_workers=0", "attention.kind=anchor", *extra,
    ])
    return cfg, {r["key"] for r in rows}


def _take(loader, n):
    return [b for _, b in zip(range(n), loader)]


def test_passkey_datamodule_from_the_registry(tmp_path, tokenizer):
    from longcpt.data import build_datamodule

    cfg, keys = _passkey_config(tmp_path, tokenizer)
    dm = build_datamodule(cfg, tokenizer)
    batches = _take(dm.train_dataloader(), 6)  # 6 examples: 3 batches per epoch, then the next epoch
    b = batches[0]
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (2, 320)
    assert b["cu_seqlens"].tolist()[-1] == 640
    for row_labels in b["labels"]:
        supervised = row_labels.ne(-100).nonzero().flatten().tolist()
        assert supervised[0] == 299  # the last prompt token predicts the first answer token
        answer = row_labels[supervised].tolist()
        assert int(tokenizer.decode(answer, skip_special_tokens=True)) in keys
        assert answer[-1] == tokenizer.eos_token_id
    epoch = lambda bs: sorted(tuple(r) for x in bs for r in x["input_ids"].tolist())  # noqa: E731
    assert epoch(batches[:3]) == epoch(batches[3:])  # every example once per epoch
    assert dm.val_dataloader() == []


@pytest.mark.parametrize("workers", [0, 2])
def test_task_datamodule_resumes_with_the_next_example(tmp_path, tokenizer, workers):
    from longcpt.data import build_datamodule

    cfg, _ = _passkey_config(tmp_path, tokenizer, f"data.num_workers={workers}")
    reference = _take(build_datamodule(cfg, tokenizer).train_dataloader(), 5)
    resumed = build_datamodule(cfg, tokenizer)
    resumed.load_state_dict({"consumed_samples": 4, "global_step": 2})  # 2 steps of 2 examples done
    again = _take(resumed.train_dataloader(), 3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, reference[2:]))
    assert resumed.state_dict()["consumed_samples"] == 4


def test_task_order_deals_disjoint_examples_to_ranks():
    from longcpt.data.task import task_order

    ranks = [list(itertools.islice(task_order(10, seed=1, rank=r, world_size=3), 6)) for r in range(3)]
    first_epoch = sorted(x for r in ranks for x in r[:3])
    assert first_epoch == sorted(set(first_epoch)) and len(first_epoch) == 9
    assert list(itertools.islice(task_order(10, 1, 0, 3, start=2), 4)) == ranks[0][2:6]


def test_train_on_input_is_refused_for_pretraining():
    from longcpt.errors import ConfigError

    with pytest.raises(ConfigError, match="data.train_on_input=true: applies to task fine-tuning only"):
        load_config(REPO / "recipes/tiny_cpu.yaml", ["data.train_on_input=true"], check_paths=False)
