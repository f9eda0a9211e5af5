"""DeepSpeed config generation from the recipe (the multi-process runs are in test_lit_distributed)."""

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from longcpt.config import load_config
from longcpt.errors import ConfigError
from longcpt.strategies import CPUDeepSpeedStrategy, build_strategy, deepspeed_config

BASE = ["model.config={model_type: llama}", "model.tokenizer=tok"]


def cfg(*overrides):
    return load_config(None, [*BASE, *overrides])


def test_stage3_offload_and_pass_through_settings():
    c = cfg("strategy.name=deepspeed", "strategy.stage=3", "strategy.offload_optimizer=true",
            "strategy.offload_parameters=true", "data.micro_batch_size=3",
            "strategy.deepspeed={zero_optimization: {reduce_bucket_size: 1000, overlap_comm: false}, wall_clock_breakdown: true}")
    ds = deepspeed_config(c)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 1000 and zero["overlap_comm"] is False  # recipe wins, deep-merged
    assert zero["contiguous_gradients"] is True and ds["wall_clock_breakdown"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 3


def test_keys_owned_by_the_recipe_are_refused_with_the_key_to_use():
    clash = "strategy.deepspeed={gradient_accumulation_steps: 4, bf16: {enabled: true}}"
    with pytest.raises(ConfigError) as err:  # found by validation, before any Trainer exists
        cfg("strategy.name=deepspeed", clash, "optim.lr=-1")
    message = str(err.value)
    assert "3 problem(s)" in message and "optim.lr=-1" in message  # in one message with the others
    assert "optim.accumulate_grad_batches" in message and "trainer.precision" in message
    c = cfg("strategy.name=deepspeed")
    c.strategy.deepspeed = {"gradient_accumulation_steps": 4}  # a recipe edited in Python after loading
    with pytest.raises(ConfigError, match="optim.accumulate_grad_batches"):
        deepspeed_config(c)


def test_strategy_per_name_and_accelerator():
    assert build_strategy(cfg(), "cpu") == "auto"
    assert isinstance(build_strategy(cfg("strategy.name=ddp"), "gpu"), DDPStrategy)
    ds = cfg("strategy.name=deepspeed")
    assert type(build_strategy(ds, "cpu")) is CPUDeepSpeedStrategy
    assert type(build_strategy(ds, "gpu")) is DeepSpeedStrategy


SP_MODEL = "model.config={model_type: llama, num_attention_heads: 8, num_key_value_heads: 2}"


def test_sequence_parallel_problems_name_the_keys():
    ok = cfg(SP_MODEL, "strategy.name=ddp", "trainer.devices=4", "strategy.sequence_parallel=4", "data.seq_len=64")
    assert ok.strategy.sequence_parallel == 4  # 2 KV heads repeated for 4 ranks
    with pytest.raises(ConfigError) as err:
        cfg("model.config={model_type: llama, num_attention_heads: 6, num_key_value_heads: 4}", "trainer.devices=4",
            "strategy.sequence_parallel=4", "data.seq_len=66")
    message = str(err.value)
    assert "strategy.name='auto'" in message  # SP needs ddp or deepspeed
    assert "data.seq_len=66" in message and "num_attention_heads=6" in message
    assert "num_key_value_heads=4" not in message  # 4 KV heads split over 4 ranks
    with pytest.raises(ConfigError) as err:
        cfg(SP_MODEL, "strategy.name=ddp", "trainer.devices=3", "strategy.sequence_parallel=4",
            "attention.kind=infini")
    message = str(err.value)
    assert "world size" in message and "= 3" in message
    assert "attention.kind='infini'" in message and "constant in the window length" in message
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        cfg("model.config={model_type: llama, num_attention_heads: 6, num_key_value_heads: 3}",
            "strategy.name=ddp", "trainer.devices=2", "strategy.sequence_parallel=2")


def test_sequence_parallel_groups_are_consecutive_ranks():
    from longcpt.strategies import data_parallel_coordinates

    # 8 ranks, groups of 4: ranks 0-3 read data shard 0, ranks 4-7 shard 1
    assert [data_parallel_coordinates(r, 8, 4) for r in (0, 3, 4, 7)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert data_parallel_coordinates(5, 8, 1) == (5, 8)
