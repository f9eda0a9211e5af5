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
from longcpt.model.recipe import model_args
from longcpt.plan import estimate, parse_size
from longcpt.plan.shape import ModelShape

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
    # longcpt's DeepSpeed config accumulates gradients in float32: 4 B per parameter / N, at stage 2
    # from the backward to the end of the step, at stage 3 for the whole run.
    zero2 = states("strategy.name=deepspeed", "strategy.stage=2")
    assert zero2 == {"parameters": (2 * p, True), "gradient partition": (4 * p // 8, False),
                     "float32 master weights": (4 * p // 8, True), "Adam moments": (8 * p // 8, True)}
    zero3 = states("strategy.name=deepspeed", "strategy.stage=3")
    small = 65 * 4096  # the RMSNorm weights stay gathered (<= 1e5 elements each)
    largest = 32000 * 4096  # the embedding (and the LM head)
    assert zero3["parameter shard"] == (2 * p // 8, True)
    assert zero3["persistent small parameters"] == (2 * small, True)
    assert zero3["gathered parameters: one module"] == (2 * largest, False)
    assert zero3["gathered parameters: kept live"] == (2 * 10**9, False)
    assert zero3["gradient partition"] == (4 * p // 8, True)
    assert zero3["gathered gradients"] == (2 * largest, False)
    bf16_accumulation = states("strategy.name=deepspeed", "strategy.stage=3",
                               "strategy.deepspeed={data_types: {grad_accum_dtype: bf16}}")
    assert bf16_accumulation["gradient partition"] == (2 * p // 8, True)
    offload = states("strategy.name=deepspeed", "strategy.stage=3", "strategy.offload_optimizer=true",
                     "strategy.offload_parameters=true")
    assert set(offload) == {"persistent small parameters", "gathered parameters: one module",
                            "gathered parameters: kept live", "gathered gradients"}


def test_deepspeed_buffers_are_in_the_configs_dtypes():
    """ZeRO-3's bucket is allocated once in the communication dtype (float32 here), ZeRO-2's in the
    parameters' dtype at each backward, and converted to the communication dtype while reduced."""
    from longcpt.plan.estimate import _layout
    from longcpt.plan.memory import buffer_items, precision_of

    def buffers(stage):
        cfg = tiny("trainer.devices=2", "strategy.name=deepspeed", f"strategy.stage={stage}",
                   "trainer.precision=bf16-mixed")
        shape = ModelShape.from_args(model_args(cfg))
        return {i.name: (i.bytes, i.when) for i in buffer_items(cfg, shape, precision_of(cfg), _layout(cfg)[0])}

    assert buffers(3) == {"gradient reduce bucket": (4 * 500_000_000, ())}
    assert buffers(2) == {"gradient reduce buckets": (2 * 2 * 500_000_000, ("backward",)),  # overlap_comm: two
                          "bucket being reduced, in the communication dtype": (4 * 500_000_000, ("backward",))}


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


LORA = "model.lora={r: 8, alpha: 16, trainable: [embed_tokens, norm]}"


def tiny_lora(folder: Path, *overrides: str):
    """The tiny recipe adapting a pretrained folder of that model (only its config.json is read)."""
    import yaml

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(yaml.safe_load(TINY)))
    return load_config(None, [f"model.pretrained={folder}", "model.tokenizer=none", "trainer.accelerator=cpu",
                              "trainer.devices=1", "trainer.precision=32-true", LORA, *overrides])


def test_lora_counts_what_training_trains_and_freezes(tmp_path):
    """The plan's trained / frozen split is the one `longcpt train` makes (a real adapted model)."""
    from longcpt.lora.adapters import apply_lora
    from longcpt.model import CausalLM

    cfg = tiny_lora(tmp_path)
    model = CausalLM(model_args(cfg))
    apply_lora(model, cfg.model.lora)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    shape = estimate(cfg).shape
    assert (shape.parameters, shape.frozen) == (trained, frozen)
    assert shape.lora.adapted == {"q_proj", "k_proj", "v_proj", "o_proj"} and not shape.lora.head


def test_lora_keeps_gradients_and_moments_for_the_trained_parameters_only(tmp_path):
    """LongLoRA's 7B recipe: gradients and AdamW states of 139M trained parameters, all 6.7B weights in
    bf16; under DDP bf16-mixed the frozen weights are bf16 and the trained ones float32."""
    cfg = load_config(REPO / "recipes" / "longlora_llama2_7b_32k.yaml",
                      [f"model.pretrained={FIXTURES / 'Llama-2-7b-hf'}"])
    plan = estimate(cfg)
    trained = 32_000 * 4096 + 32 * 4 * 8 * (4096 + 4096) + (32 * 2 + 1) * 4096  # embed, q/k/v/o adapters, norms
    assert plan.parameters == trained and plan.shape.weights == 6_738_415_616 + 32 * 4 * 8 * (4096 + 4096)
    item = {i.name: i.bytes for i in plan.items}
    assert item["parameters"] == plan.shape.weights * 2  # ZeRO-2: every rank holds every weight, bf16
    assert item["gradient partition"] == -(-trained // 8) * 4
    assert item["Adam moments"] == 2 * -(-trained // 8) * 4
    ddp = estimate(tiny_lora(tmp_path, "trainer.devices=2", "strategy.name=ddp", "trainer.precision=bf16-mixed"))
    item = {i.name: i.bytes for i in ddp.items}
    assert item["frozen parameters"] == ddp.shape.frozen * 2
    assert item["trained parameters"] == item["gradients"] == ddp.parameters * 4
    assert item["AdamW moments"] == 2 * ddp.parameters * 4
    full = estimate(tiny("trainer.devices=2", "strategy.name=ddp", "trainer.precision=bf16-mixed"))
    assert ddp.step.model_flops < full.step.model_flops  # frozen weights' gradients are not computed


# ----------------------------------------------------------------------------------------------
# Verdicts


SHIPPED = [  # recipe, the model it names, the hardware its header states
    ("anchor_llama2_7b_64k.yaml", "Llama-2-7b-hf"),
    ("anchor_llama3_8b_128k.yaml", "Meta-Llama-3-8B"),
    ("infini_1b_8k.yaml", "Llama-3.2-1B"),
    ("longlora_llama2_7b_32k.yaml", "Llama-2-7b-hf"),
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


# ----------------------------------------------------------------------------------------------
# Against DeepSpeed's own estimators, MFU and host memory


def _deepspeed_estimate(stage: int, shape: ModelShape, world: int, offload: str) -> tuple[int, int]:
    """(host bytes per node, GPU bytes) from `estimate_zero{2,3}_model_states_mem_needs`, the
    functions DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs_all_cold` tabulate."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(shape.parameters, min(world, 8), max(1, world // 8),
                                                     cpu_offload=bool(offload))
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.parameters, shape.largest_module, min(world, 8), max(1, world // 8),
        cpu_offload=bool(offload), cpu_offload_params=offload == "all", zero_init=True)
    return cpu, gpu


@pytest.mark.parametrize("model", ["Llama-2-7b-hf", "Meta-Llama-3-8B"])
@pytest.mark.parametrize("stage, offload", [(2, ""), (3, ""), (3, "optimizer"), (3, "all")])
@pytest.mark.parametrize("world", [8, 16])
def test_model_states_agree_with_deepspeeds_estimators(monkeypatch, model, stage, offload, world):
    """Model states as DeepSpeed's estimators count them: the sharded states plus, at stage 3, one
    module gathered with its gradients (`kept live` is the plan's allowance for
    stage3_max_live_parameters, which the estimator leaves out). At stage 2 DeepSpeed's 18 bytes per
    parameter / N include a 16-bit gradient partition ("2_grads_16bit") that longcpt's float32
    gradient accumulation does not allocate: the plan is lower by exactly that."""
    from longcpt.plan.estimate import _layout
    from longcpt.plan.memory import model_state_items, precision_of

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = load_config(None, [f"model.pretrained={FIXTURES / model}", "trainer.accelerator=gpu",
                             f"trainer.devices={min(world, 8)}", f"trainer.num_nodes={max(1, world // 8)}",
                             "strategy.name=deepspeed", f"strategy.stage={stage}", "trainer.precision=bf16-mixed",
                             f"strategy.offload_optimizer={bool(offload)}",
                             f"strategy.offload_parameters={offload == 'all'}"])
    shape = ModelShape.from_args(model_args(cfg))
    items = model_state_items(cfg, shape, precision_of(cfg), _layout(cfg)[0])
    ours = sum(i.bytes for i in items if i.name != "gathered parameters: kept live")
    _, deepspeed = _deepspeed_estimate(stage, shape, world, offload)
    if stage == 2:
        deepspeed -= 2 * shape.parameters // world
    assert ours == pytest.approx(deepspeed, rel=0.05)


@pytest.mark.parametrize("stage, offload", [(2, "optimizer"), (3, "optimizer"), (3, "all")])
def test_offload_plans_host_memory_and_deepspeed_says_more(monkeypatch, stage, offload):
    """With offload the plan states host memory per node; DeepSpeed's estimator (which adds 50% and,
    at stage 2, a float32 model copy per rank) asks for more, never less."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = load_config(REPO / "recipes" / "anchor_llama2_7b_64k.yaml", [
        f"model.pretrained={FIXTURES / 'Llama-2-7b-hf'}", f"strategy.stage={stage}", "strategy.offload_optimizer=true",
        f"strategy.offload_parameters={offload == 'all'}"])
    plan = estimate(cfg)
    p, shard = plan.parameters, -(-plan.parameters // 8)
    offloaded = (4 + 8 + (4 if stage == 2 else 4)) * shard + (2 * shard if offload == "all" else 0)
    assert sum(i.bytes for i in plan.host_items if i.persistent) >= offloaded
    assert plan.host_per_node >= 8 * offloaded
    host, _ = _deepspeed_estimate(stage, plan.shape, 8, offload)
    assert plan.host_per_node <= host
    if stage == 2:  # each rank builds and loads the whole model (bf16) before DeepSpeed shards it
        assert any(i.when == ("load",) and i.bytes == 2 * p for i in plan.host_items)
    assert plan.to_json()["host_bytes_per_node"] == plan.host_per_node


def test_offload_is_suggested_only_where_the_host_memory_fits(capsys):
    recipe = str(REPO / "recipes" / "anchor_llama2_7b_64k.yaml")
    args = [recipe, f"model.pretrained={FIXTURES / 'Llama-2-7b-hf'}", "data.seq_len=4096", "--gpu-memory", "16GiB"]
    assert main(["plan", *args]) == 0
    change = capsys.readouterr().out.split("\nchange")[-1]
    assert "strategy.offload_optimizer=true" in change and "host 100.41 GiB per node" in change
    assert main(["plan", *args, "--host-memory", "64GiB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["host_memory_bytes"] == 64 * GIB and doc["suggestion"] is None
    offloads = [c for c in doc["tried"] if any("offload" in o for o in c["overrides"])]
    assert offloads and all(c["host_bytes_per_node"] > 64 * GIB and not c["fits"] for c in offloads)


def test_mfu_counts_model_flops_only_and_hfu_adds_recomputation():
    """PaLM's MFU: model FLOPs / (devices x peak x step time); recomputation (activation
    checkpointing) shows in the hardware FLOPs utilisation, not in the step time at a given MFU."""
    cfg = load_config(REPO / "recipes" / "anchor_llama2_7b_64k.yaml", [f"model.pretrained={FIXTURES / 'Llama-2-7b-hf'}"])
    step = estimate(cfg, mfu=0.4).step
    assert cfg.trainer.activation_checkpointing and step.recompute_flops > 0
    assert step.model_flops / (8 * step.peak_flops * step.seconds) == pytest.approx(0.4)
    assert step.hfu == pytest.approx((step.model_flops + step.recompute_flops) / (8 * step.peak_flops * step.seconds))
    assert step.hfu == pytest.approx(0.4 * 4 / 3)  # one forward recomputed: 4 passes' worth instead of 3


def test_plan_json_with_a_missing_model_folder_is_still_json(tmp_path, capsys):
    recipe = str(REPO / "recipes" / "anchor_llama2_7b_64k.yaml")
    assert main(["plan", recipe, f"model.pretrained={tmp_path / 'absent'}", "--json"]) == 2
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["recipe"] == recipe and "model.pretrained" in doc["error"] and doc["problems"]
    assert "no config.json" in err
