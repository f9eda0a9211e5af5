"""DeepSpeed config generation from the recipe (the multi-process runs are in test_lit_distributed)."""

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from longcpt.config import load_config
from longcpt.errors import ConfigError
from longcpt.strategies import CPUDeepSpeedStrategy, build_strategy, deepspeed_config, skip_shm_all_reduce

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


@pytest.mark.subprocess  # DeepSpeed probes its ops with gcc
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


@pytest.mark.parametrize("stage", [2, 3])
def test_gradients_accumulate_and_reduce_in_fp32(stage):
    """Under bf16, DeepSpeed would otherwise sum micro-batch gradients and all-reduce them in bf16
    (its engine defaults both to the model dtype); the DDP path accumulates in fp32."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = deepspeed_config(cfg("strategy.name=deepspeed", f"strategy.stage={stage}", "trainer.precision=bf16-mixed"))
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    # As DeepSpeed reads it, with the bf16 section Lightning adds for bf16-mixed:
    parsed = DeepSpeedConfig({**ds, "bf16": {"enabled": True}, "gradient_accumulation_steps": 4})
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.float32
    # A recipe may still choose otherwise under strategy.deepspeed.
    own = deepspeed_config(cfg("strategy.name=deepspeed", "strategy.deepspeed={communication_data_type: bf16}"))
    assert own["communication_data_type"] == "bf16"


@pytest.mark.parametrize("strategy, precision, dtype", [
    ("deepspeed", "bf16-mixed", torch.bfloat16), ("deepspeed", "32-true", torch.float32),
    ("ddp", "bf16-mixed", torch.float32), ("auto", "bf16-true", torch.bfloat16),
])
def test_pretrained_weights_load_in_the_dtype_the_strategy_gives_them(tmp_path, tokenizer_dir, strategy, precision,
                                                                      dtype):
    """DeepSpeed under bf16 casts the parameters to bf16 when it wraps the model (and builds its fp32
    masters from those), so an fp32 load only doubles what every ZeRO-3 rank holds in host memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longcpt.data import load_tokenizer
    from longcpt.lit.train import build_model

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2))
    hf.save_pretrained(tmp_path / "hf")
    c = load_config(None, [f"model.pretrained={tmp_path / 'hf'}", f"model.tokenizer={tokenizer_dir}",
                           f"strategy.name={strategy}", f"trainer.precision={precision}"])
    model = build_model(c, load_tokenizer(tokenizer_dir))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE tables stay fp32 (the BF16 fix)
    # The same bits DeepSpeed's own cast of the fp32 weights gives.
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, hf.state_dict()[name].to(dtype), rtol=0, atol=0)


def test_deepspeed_counts_the_windows_of_a_step_under_sequence_parallelism(monkeypatch):
    """8 ranks in groups of 4: a step holds micro x accumulation x 8 / 4 windows, and DeepSpeed's
    `train_batch_size` (its samples and throughput counters) says so; without sequence parallelism
    it is micro x accumulation x 8."""
    import deepspeed.runtime.config as ds_config

    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: 8)
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    base = [SP_MODEL, "strategy.name=deepspeed", "trainer.devices=8", "data.seq_len=64", "data.micro_batch_size=3"]
    for sp, windows in ((4, 3 * 2 * 8 // 4), (1, 3 * 2 * 8)):
        ds = deepspeed_config(cfg(*base, f"strategy.sequence_parallel={sp}"))
        parsed = ds_config.DeepSpeedConfig({**ds, "gradient_accumulation_steps": 2})  # as Lightning adds it
        assert parsed.train_batch_size == windows
    with pytest.raises(ConfigError, match="strategy.sequence_parallel"):
        cfg(*base, "strategy.deepspeed={sequence_parallel_size: 2}")


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def test_sequence_parallel_groups_get_the_runs_timeout(one_process_group):
    from datetime import timedelta

    from longcpt.strategies import sequence_parallel_group

    group = sequence_parallel_group(1, timeout_minutes=7)
    assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(minutes=7)


def test_a_sequence_parallel_group_across_nodes_is_warned_about(monkeypatch):
    """4 ranks in groups of 2 with a cyclic placement over two nodes: every group spans both."""
    import torch.distributed as dist

    from longcpt.strategies import groups_spanning_nodes, sequence_parallel_group

    assert groups_spanning_nodes([[0, 1], [2, 3]], ["a", "a", "b", "b"]) == []
    assert groups_spanning_nodes([[0, 1], [2, 3]], ["a", "b", "a", "b"]) == [([0, 1], ["a", "b"]), ([2, 3], ["a", "b"])]
    made = []
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 4)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "new_group", lambda ranks, timeout=None: made.append((ranks, timeout)) or ranks)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), ["a", "b", "a", "b"]))
    with pytest.warns(RuntimeWarning, match=r"2 of 2 sequence-parallel groups span nodes \(ranks 0-1 on a, b\)"):
        assert sequence_parallel_group(2, timeout_minutes=30) == [0, 1]
    assert [ranks for ranks, _ in made] == [[0, 1], [2, 3]]


def test_a_window_the_group_size_does_not_divide_is_refused():
    """Sharding 5 tokens over 2 ranks would drop the last one without a word."""
    from longcpt.errors import LongcptError
    from longcpt.model.attention.ulysses import SequenceParallel

    sp = SequenceParallel(group=None, size=2, rank=1)
    assert sp.shard(torch.arange(8)[None]).tolist() == [[4, 5, 6, 7]]
    with pytest.raises(LongcptError, match="window length divisible by 2; this window has 5 tokens"):
        sp.shard(torch.arange(5)[None])


@pytest.mark.subprocess  # DeepSpeed probes its ops with gcc
def test_the_shared_memory_all_reduce_kernel_is_not_built(monkeypatch):
    """On a CPU, DeepSpeed's communication backend gets no shared-memory kernel to build (a gcc
    build of about 40 s on a machine's first run, used by tensor-parallel inference only)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    skip_shm_all_reduce()
    assert build_shm_op() is None
