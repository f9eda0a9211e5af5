"""Every registered attention kind is wired everywhere it must be, through the registry alone.

What a kind declares (`longcpt.model.attention.KindSpec` and its `KindHooks`) is what the rest
of longcpt acts on: the planner, the doctor, export, the optimizer and the callbacks ask the
registry and never name a kind, and a kind that is unknown or half-declared is an error, never a
silent stand-in.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longcpt.errors import LongcptError
from longcpt.model.attention import KINDS, KindHooks

TRAINABLE = sorted(name for name, spec in KINDS.items() if spec.trainable)
TINY = ("{model_type: llama, vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,"
        " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 4096}")


def tiny_recipe(*overrides: str):
    from longcpt.config import load_config

    return load_config(None, [f"model.config={TINY}", "model.tokenizer=none", "trainer.accelerator=cpu",
                              "trainer.devices=1", "trainer.precision=32-true", "data.seq_len=512", *overrides])


@pytest.mark.parametrize("kind", TRAINABLE)
def test_every_trainable_kind_has_plan_terms_and_doctor_checks(kind):
    from longcpt.doctor.kernels import KindCheckTools
    from longcpt.plan import estimate

    hooks = KINDS[kind].hooks
    assert hooks.plan is not None and hooks.doctor is not None
    checks = hooks.doctor(KindCheckTools(torch.device("cpu"), quick=True))
    assert checks and all(section in ("environment", "kernels") and name and callable(run)
                          for section, name, run in checks)
    plan = estimate(tiny_recipe(f"attention.kind={kind}"), suggest=False)
    assert plan.step.pairs.pairs > 0 and plan.per_gpu_bytes["activations"] > 0


def test_a_kind_without_plan_terms_is_refused_not_planned_as_another(monkeypatch):
    from longcpt.plan import estimate

    cfg = tiny_recipe("attention.kind=intra_doc")
    estimate(cfg, suggest=False)
    monkeypatch.setitem(KINDS, "intra_doc", dataclasses.replace(KINDS["intra_doc"], hooks=KindHooks()))
    with pytest.raises(LongcptError, match="intra_doc.*declares no plan terms"):
        estimate(cfg, suggest=False)


def test_an_unknown_kind_is_an_error_not_a_stand_in():
    from longcpt.model.attention import inference_kind, kind_spec

    for ask in (kind_spec, inference_kind):
        with pytest.raises(LongcptError, match="'sliding' is unknown; known kinds"):
            ask("sliding")


def test_doctor_steps_train_the_recipes_kind(monkeypatch, tmp_path):
    """`longcpt doctor --recipe` checks the recipe's own kind (it once replaced unknown ones with anchor)."""
    from longcpt.doctor import build_checks, steps

    monkeypatch.setitem(KINDS, "toy", dataclasses.replace(KINDS["full"], name="toy"))  # a kind doctor never heard of
    seen = []
    monkeypatch.setattr(steps, "check_step", lambda *args: seen.append(args[5]))
    checks = build_checks(tiny_recipe("attention.kind=toy"), torch.device("cpu"), True, tmp_path)
    next(c for c in checks if c.name == "step single device").run()
    assert seen == ["toy"]


def test_doctor_runs_each_kinds_checks_once():
    from longcpt.doctor.kernels import kind_checks

    names = [c.name for c in kind_checks(torch.device("cpu"), quick=True)]
    assert len(names) == len(set(names))  # intra_doc and anchor share one hook: its checks appear once
    assert {"attention libraries", "document kernels", "intra_doc / anchor", "full", "infini memory"} <= set(names)
