"""`longcpt plan` and `longcpt.plan.estimate`: model shapes, memory terms, verdicts and bad input.

The measured-memory checks are in test_plan_memory.py; these run without training anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcpt.cli import main
from longcpt.config import load_config
from longcpt.errors import LongcptError
from longcpt.plan import estimate, parse_size
from longcpt.plan.shape import ModelShape, model_args

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "model_configs"
GIB = 2**30
TINY = ("{model_type: llama, vocab_size: 8192, hidden_size: 128, intermediate_size: 352, num_hidden_layers: 4,"
        " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 65536}")


def tiny(*overrides: str):
    return load_config(None, [f"model.config={TINY}", "model.tokenizer=none", "trainer.accelerator=cpu",
                              "trainer.devices=1", "trainer.precision=32-true", *overrides])


# ----------------------------------------------------------------------------------------------
# Model shapes


@pytest.mark.parametrize("folder, kind, parameters", [
    ("Llama-2-7b-hf", "anchor", 6_738_415_616),     # the published parameter counts
    ("Meta-Llama-3-8B", "anchor", 8_030_261_248),
    ("Llama-3.2-1B", "full", 1_235_814_400),         # tied embeddings counted once
    ("Llama-3.2-1B", "infini", 1_235_814_400 + 16 * 32),  # + one gate per query head and layer
])
def test_parameter_counts_are_the_published_ones(folder, kind, parameters):
    cfg = load_config(None, [f"model.pretrained={FIXTURES / folder}", f"attention.kind={kind}"])
    assert ModelShape.from_args(model_args(cfg)).parameters == parameters


def test_pretrained_without_config_json_is_one_error_naming_the_key(tmp_path):
    cfg = load_config(None, [f"model.pretrained={tmp_path}"])
    with pytest.raises(LongcptError, match="model.pretrained=.*no config.json"):
        estimate(cfg)


# ----------------------------------------------------------------------------------------------
# Memory terms


def test_totals_add_up_and_json_has_the_contract_keys():
    plan = estimate(tiny("data.seq_len=2048"))
    doc = plan.to_json()
    assert set(doc["per_gpu_bytes"]) == {"weights", "gradients", "optimizer", "activations", "other", "total"}
    b = doc["per_gpu_bytes"]
    assert b["total"] == sum(b[k] for k in ("weights", "gradients", "optimizer", "activations", "other"))
    assert doc["parameters"] == plan.parameters and isinstance(doc["fits"], bool)
    assert sum(i["bytes"] for i in doc["items"]) == b["total"]
    json.dumps(doc)  # serialisable


def test_zero_stages_shard_the_model_states():
    from longcpt.plan.estimate import _layout
    from longcpt.plan.memory import model_state_items, precision_of

    def states(*o):
        cfg = load_config(None, [f"model.pretrained={FIXTURES / 'Llama-2-7b-hf'}", "trainer.devices=8",
                                 "trainer.accelerator=gpu", *o])
        shape = ModelShape.from_args(model_args(cfg))
        items = model_state_items(cfg, shape, precision_of(cfg), _layout(cfg)[0])
        return {i.name: (i.bytes, i.persistent) for i in items}

    p = 6_738_415_616
    ddp = states("strategy.name=ddp", "trainer.precision=bf16-mixed")  # float32 weights under autocast
    assert ddp == {"parameters": (4 * p, True), "gradients": (4 * p, True), "AdamW moments": (8 * p, True)}
    # DeepSpeed's own estimate (2 + 18/N bytes per parameter at stage 2) less the float32 gradient
    # copy that exists only in the optimizer step; ZeRO-2's gradient partition comes and goes.
    zero2 = states("strategy.name=deepspeed", "strategy.stage=2")
    assert zero2 == {"parameters": (2 * p, True), "gradient partition": (2 * p // 8, False),
                     "float32 master weights": (4 * p // 8, True), "Adam moments": (8 * p // 8, True)}
    zero3 = states("strategy.name=deepspeed", "strategy.stage=3")
    small = 65 * 4096  # the RMSNorm weights stay gathered (<= 1e5 elements each)
    largest = 32000 * 4096  # the embedding (and the LM head)
    assert zero3["parameter shard"] == (2 * p // 8, True)
    assert zero3["persistent small parameters"] == (2 * small, True)
    assert zero3["gathered parameters"] == (2 * (10**9 + largest), False)
    assert zero3["gradient partition"] == (2 * p // 8, True)
    assert zero3["gathered gradients"] == (2 * largest, False)
    offload = states("strategy.name=deepspeed", "strategy.stage=3", "strategy.offload_optimizer=true",
                     "strategy.offload_parameters=true")
    assert set(offload) == {"persistent small parameters", "gathered parameters", "gathered gradients"}


def test_checkpointing_and_sequence_parallel_cut_activations():
    base = ["trainer.devices=4", "strategy.name=ddp", "data.seq_len=16384", "attention.kind=anchor"]
    act = {name: estimate(tiny(*base, *extra)).per_gpu_bytes["activations"] for name, extra in {
        "plain": [], "checkpointing": ["trainer.activation_checkpointing=true"],
        "sp2": ["strategy.sequence_parallel=2"], "sp4": ["strategy.sequence_parallel=4"]}.items()}
    assert act["checkpointing"] < act["plain"] / 2
    assert act["sp4"] < act["sp2"] < act["plain"]
    plan = estimate(tiny(*base, "strategy.sequence_parallel=2"))
    assert any(i.name == "all-to-all send/receive copies" for i in plan.items)


def test_attention_pairs_come_from_the_data(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[7] * 99] * 64}).save_to_disk(str(tmp_path / "train"))
    # Each document takes 1 + 99 + 1 = 101 tokens (BOS, body, EOS): four fill a 404-token window.
    anchor = estimate(tiny("data.seq_len=404", "attention.kind=anchor", f"data.train={tmp_path / 'train'}"))
    assert anchor.step.pairs.pairs == 4 * 101 * 102 / 2
    assert "document lengths" in anchor.step.pairs.source
    full = estimate(tiny("data.seq_len=404", "attention.kind=full", f"data.train={tmp_path / 'train'}"))
    assert full.step.pairs.pairs == 404 * 405 / 2
    assert full.step.model_flops > anchor.step.model_flops


# ----------------------------------------------------------------------------------------------
# Verdicts


SHIPPED = [  # recipe, the model it names, the hardware its header states
    ("anchor_llama2_7b_64k.yaml", "Llama-2-7b-hf"),
    ("anchor_llama3_8b_128k.yaml", "Meta-Llama-3-8B"),
    ("infini_1b_8k.yaml", "Llama-3.2-1B"),
]


@pytest.mark.parametrize("recipe, model", SHIPPED)
def test_shipped_gpu_recipes_fit_80gib_gpus(recipe, model):
    plan = estimate(load_config(REPO / "recipes" / recipe, [f"model.pretrained={FIXTURES / model}"]))
    assert plan.layout.device == "gpu"
    assert plan.fits, f"{recipe}: {plan.per_gpu_bytes['total'] / GIB:.1f} GiB"


def test_a_recipe_that_does_not_fit_gets_the_smallest_change_that_does():
    overrides = [f"model.pretrained={FIXTURES / 'Meta-Llama-3-8B'}", "trainer.activation_checkpointing=false"]
    recipe = REPO / "recipes" / "anchor_llama3_8b_128k.yaml"
    plan = estimate(load_config(recipe, overrides))
    assert not plan.fits and plan.suggestion is not None
    assert plan.suggestion.overrides == ("trainer.activation_checkpointing=true",) or plan.suggestion.fits
    again = estimate(load_config(recipe, [*overrides, *plan.suggestion.overrides]))
    assert again.fits and again.per_gpu_bytes["total"] == plan.suggestion.total


def test_nothing_fits_a_tiny_gpu(capsys):
    recipe = REPO / "recipes" / "anchor_llama2_7b_64k.yaml"
    code = main(["plan", str(recipe), f"model.pretrained={FIXTURES / 'Llama-2-7b-hf'}", "--gpu-memory", "1GiB"])
    out = capsys.readouterr().out
    assert code == 0
    assert "does NOT fit" in out and "nothing tried fits" in out


# ----------------------------------------------------------------------------------------------
# Command line and bad input


def test_plan_prints_a_table_and_json(capsys):
    recipe = str(REPO / "recipes" / "anchor_llama2_7b_64k.yaml")
    model = f"model.pretrained={FIXTURES / 'Llama-2-7b-hf'}"
    assert main(["plan", recipe, model]) == 0
    table = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer", "activations", "other", "total", "fits", "TFLOP/s"):
        assert word in table
    assert main(["plan", recipe, model, "--json", "--gpu-memory", "40GB"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpu_memory_bytes"] == 40 * 10**9 and doc["parameters"] == 6_738_415_616


@pytest.mark.parametrize("text, size", [
    ("80GiB", 80 * 2**30), ("40GB", 40 * 10**9), ("24576MiB", 24576 * 2**20), (" 1.5 TiB ", int(1.5 * 2**40)),
    ("80gib", 80 * 2**30), ("512KB", 512_000),
])
def test_gpu_memory_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, words", [
    ("80", "no unit"), ("80G", "did you mean 80GiB"), ("eighty", "not a size"), ("-1GiB", "not a size"),
    ("0GiB", "more than 0"), ("80 GiBs", "unknown unit"),
])
def test_bad_gpu_memory_is_one_clear_error(text, words, capsys):
    recipe = str(REPO / "recipes" / "tiny_cpu.yaml")
    assert main(["plan", recipe, f"--gpu-memory={text}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longcpt plan: error: --gpu-memory") and words in err and "Traceback" not in err


def test_plan_reports_recipe_problems_exactly_as_train_does(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "tok").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  config: {TINY}\n  tokenizer: {tmp_path / 'tok'}\ndata:\n  train: {tmp_path / 'data'}\n"
                      "trainer:\n  max_stepz: 3\n")
    bad = ["optim.lr=0", "attention.kind=infini", "strategy.sequence_parallel=2", "strategy.name=ddp"]
    assert main(["train", str(recipe), *bad]) == 2
    train_err = capsys.readouterr().err
    assert main(["plan", str(recipe), *bad]) == 2
    plan_err = capsys.readouterr().err
    assert train_err.startswith("longcpt train: error:") and plan_err.startswith("longcpt plan: error:")
    assert plan_err.removeprefix("longcpt plan") == train_err.removeprefix("longcpt train")
    for words in ("max_stepz", "optim.lr=0", "strategy.sequence_parallel=2 with attention.kind='infini'"):
        assert words in plan_err
