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


# ----------------------------------------------------------------------------------------------
# What every kind must do: its options, its positions, its mask or its state, its export, its
# telemetry. A kind with required options adds a row to EXAMPLES; nothing else here names a kind.

KINDS_ALL = sorted(KINDS)
ARGS = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512)


def _namm_policy(tmp_path) -> dict:
    from longcpt.model.attention.namm import NammPolicy, NammSpec

    path = tmp_path / "policy.pt"
    NammPolicy.zeros(NammSpec(update_every=16)).save(path)
    return {"policy": str(path)}


# Options a kind needs to be built small (required ones, or defaults too large for 64 tokens).
EXAMPLES = {
    "h2o": lambda tmp_path: {"cache_size": 24, "update_every": 8},
    "streaming": lambda tmp_path: {"cache_size": 24, "update_every": 8},
    "infllm": lambda tmp_path: {"n_init": 2, "n_local": 16, "block_size": 4, "topk": 2, "repr_topk": 2,
                                "exc_block_size": 8},
    "namm": _namm_policy,
    "infini": lambda tmp_path: {"segment_len": 8},
}


def _options(kind: str, tmp_path) -> dict:
    return EXAMPLES.get(kind, lambda tmp_path: {})(tmp_path)


def _model(kind: str, tmp_path, seed: int = 0):
    from longcpt.model import CausalLM, ModelArgs

    torch.manual_seed(seed)
    return CausalLM(ModelArgs(**ARGS, attention=kind, attention_options=_options(kind, tmp_path))).eval()


def _ids(t: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS_ALL)
def test_options_are_one_set_for_recipes_the_python_api_and_the_command_line(kind, tmp_path):
    from longcpt.model.attention import option_problems, resolve_options
    from longcpt.model.hf_io import folder_args

    spec, given = KINDS[kind], _options(kind, tmp_path)
    resolved = resolve_options(kind, given)
    assert set(resolved) == set(spec.options) and all(resolved[k] == v for k, v in given.items())
    _, problems = option_problems(kind, {**given, "no_such_option": 1}, prefix="--attention-options ")
    assert problems and "no_such_option: not an option of attention kind" in problems[0]
    folder = tmp_path / "plain"
    from longcpt.export.hf import save_pretrained

    save_pretrained(_model("full", tmp_path), folder)  # a plain softmax model, which every kind can run
    assert folder_args(folder, kind, **given).attention_options == given  # the Python API passes them through
    assert _model(kind, tmp_path).args.attention_options == resolved  # ... and the model completes them
    if spec.trainable:  # a recipe names the same options next to attention.kind
        recipe = tiny_recipe(f"attention.kind={kind}", *(f"attention.{k}={v}" for k, v in given.items()))
        assert recipe.attention.options == resolved


@pytest.mark.parametrize("kind", KINDS_ALL)
def test_positions_follow_the_kinds_declared_rule(kind, tmp_path):
    from longcpt.batch import position_ids
    from longcpt.doctor.kernels import packed_batch

    rows = [[5, 1, 10], [9, 7]]
    batch = packed_batch(kind, rows, 64)  # what the collator gives the kind
    model = _model(kind, tmp_path)
    derived = model.context(batch["input_ids"], cu_seqlens=batch["cu_seqlens"]).position_ids
    rule = position_ids(KINDS[kind].positions, batch["cu_seqlens"], 2, 16)
    assert torch.equal(batch["position_ids"], rule) and torch.equal(derived, rule)


@pytest.mark.parametrize("kind", KINDS_ALL)
def test_a_kind_masks_documents_or_carries_a_state_across_calls(kind, tmp_path):
    """A kind that runs as another at inference (`inference_kind`) keeps the documents of a packed
    row apart; every other kind carries its state across calls: any chunking of a stream gives the
    same result as one call."""
    from longcpt.model.attention import inference_kind
    from longcpt.model.generation import forward_chunks

    model = _model(kind, tmp_path)
    if inference_kind(kind) != kind:
        cu = torch.tensor([0, 20, 48], dtype=torch.int32)
        ids = _ids(48)
        other = ids.clone()
        other[0, 1:20] = torch.randint(3, 64, (19,), generator=torch.Generator().manual_seed(9))  # document 0
        with torch.no_grad():
            a, b = model(ids, cu_seqlens=cu), model(other, cu_seqlens=cu)
        assert torch.allclose(a[0, 20:], b[0, 20:], atol=1e-6) and not torch.allclose(a[0, 1:20], b[0, 1:20])
        return
    ids = _ids(64, batch=2)
    with torch.no_grad():
        whole_state: dict = {}
        whole = torch.cat([model.lm_head(h) for _, h in forward_chunks(model, ids, whole_state, 64)], dim=1)
        for chunk in (8, 24):
            state: dict = {}
            got = torch.cat([model.lm_head(h) for _, h in forward_chunks(model, ids, state, chunk)], dim=1)
            assert torch.allclose(got, whole, atol=1e-5), (kind, chunk, (got - whole).abs().max())


@pytest.mark.parametrize("kind", [k for k in KINDS_ALL if KINDS[k].trainable])
def test_an_export_loads_back_as_the_kind_it_runs_as(kind, tmp_path):
    """`save_pretrained` then `from_pretrained` (no kind named): the kind's own export, or a plain
    folder its inference kind runs; the logits of one document are the trained model's."""
    from longcpt.export.hf import save_pretrained
    from longcpt.model import from_pretrained
    from longcpt.model.attention import inference_kind

    model = _model(kind, tmp_path)
    with torch.no_grad():
        for p in model.parameters():  # away from the initialisation, the kind's own parameters too
            p.add_(torch.randn_like(p) * 0.02)
    save_pretrained(model, tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf").eval()
    assert back.args.attention == inference_kind(kind)
    ids = _ids(40)
    with torch.no_grad():
        assert torch.allclose(back(ids), model(ids), atol=1e-5)


@pytest.mark.parametrize("kind", [k for k in KINDS_ALL if KINDS[k].hooks.inference_kind is None])
def test_the_state_reports_exactly_the_telemetry_the_kind_declares(kind, tmp_path):
    from longcpt.model.attention import TELEMETRY

    model, state = _model(kind, tmp_path), {}
    with torch.no_grad():
        model(_ids(40), position_ids=torch.arange(40)[None], state=state)
    for layer_state in state.values():
        assert {t for t in TELEMETRY if hasattr(layer_state, t)} == set(KINDS[kind].hooks.telemetry), kind


# ----------------------------------------------------------------------------------------------
# A new trainable kind is its folder plus its registration: the toy kind of tests/toy_kind/ (one
# parameter per layer, its own optimizer group, metrics, export, plan terms and doctor check)
# passes every check above without an edit anywhere else. tests/lit/test_toy_kind.py trains it.


@pytest.fixture
def toy_kind():
    import importlib
    import sys

    sys.modules.pop("toy_kind", None)
    importlib.import_module("toy_kind")  # the folder registers the kind, as model/attention's imports do
    yield "toy"
    KINDS.pop("toy", None)
    sys.modules.pop("toy_kind", None)


def test_a_toy_kind_in_its_own_folder_passes_every_conformance_check(toy_kind, tmp_path):
    from longcpt.doctor.kernels import kind_checks

    for check in (test_every_trainable_kind_has_plan_terms_and_doctor_checks,
                  test_options_are_one_set_for_recipes_the_python_api_and_the_command_line,
                  test_positions_follow_the_kinds_declared_rule,
                  test_a_kind_masks_documents_or_carries_a_state_across_calls,
                  test_an_export_loads_back_as_the_kind_it_runs_as,
                  test_the_state_reports_exactly_the_telemetry_the_kind_declares):
        folder = tmp_path / check.__name__
        folder.mkdir()
        if "tmp_path" in check.__code__.co_varnames:
            check(toy_kind, folder)
        else:
            check(toy_kind)
    row = [r for c in kind_checks(torch.device("cpu"), quick=True) if c.name == "toy" for r in c.run()]
    assert [(r.name, r.status) for r in row] == [("toy sdpa", "PASS")]
