"""`longcpt train` with strategy.sequence_parallel=2 on two CPU processes (gloo) gives the weights of
the one-process run, under DDP and under DeepSpeed ZeRO-3.

All three runs continue a pretrained folder (sharded safetensors). The ZeRO-3 run loads it into
its partitions (`builds_partitioned`: built inside `deepspeed.zero.Init`, filled from rank 0), so
equal weights also prove that loading exact, and its export loads in plain transformers.

Real prepared data, AnchorAttention, windows of 64 tokens whose documents cross the middle (each
rank holds 32 tokens), 2 windows per micro-batch. The two ranks form one group, so they read the
same windows as the single process (data-parallel degree 1) and must reach its weights; the loss
they log is the whole window's.
"""

import pytest
import torch
from lit_helpers import read_metrics, tiny_overrides, train_ok
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import longcpt
from longcpt.data import load_tokenizer
from longcpt.export.convert import read_checkpoint
from longcpt.model import CausalLM, ModelArgs

pytestmark = pytest.mark.slow


def pretrained(folder, tokenizer):
    """A tiny Llama (as tiny_overrides' model.config) with random weights, in several safetensors shards."""
    torch.manual_seed(7)
    tok = load_tokenizer(str(tokenizer))
    args = ModelArgs.from_hf_config({"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64,
                                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "max_position_embeddings": 256})
    longcpt.save_pretrained(CausalLM(args), folder, max_shard_bytes=200_000)
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def launch(forkserver, out, corpus, model, devices, steps, **extra):
    """`devices` ranks started together as fork server children (as srun starts them)."""
    args = tiny_overrides(out, None, corpus, model__pretrained=str(model), attention__kind="anchor",
                          trainer__devices=devices, trainer__max_steps=steps, optim__min_lr_ratio=1.0, **extra)
    return train_ok(forkserver, args, out.with_name(f"{out.name}-rank"), world=devices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, forkserver):
    root = tmp_path_factory.mktemp("sp")
    model = pretrained(root / "pretrained", corpus["tokenizer"])
    launch(forkserver, root / "one", corpus, model, 1, 4)
    launch(forkserver, root / "ddp", corpus, model, 2, 4, strategy__name="ddp", strategy__sequence_parallel=2)
    launch(forkserver, root / "zero3", corpus, model, 2, 4, strategy__name="deepspeed", strategy__stage=3,
           strategy__sequence_parallel=2, trainer__export_hf="true")
    return root


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_sequence_parallel_weights_equal_one_process(runs, name):
    ref, _ = read_checkpoint(runs / "one")
    got, meta = read_checkpoint(runs / name)
    assert meta["config"]["strategy"]["sequence_parallel"] == 2
    assert ref.keys() == got.keys()
    # Four AdamW steps at lr 3e-3 move weights by about 1e-2; summation order leaves float32 noise
    # of about 1e-6. Another window, a lost token at the rank boundary or a wrong attention would
    # differ by the size of a step (~1e-3).
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-5, msg=k)


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_logged_loss_and_tokens_are_the_windows(runs, name):
    ref, got = read_metrics(runs / "one"), read_metrics(runs / name)
    assert sorted(got["train/loss"]) == [0, 1, 2, 3]
    for step, loss in ref["train/loss"].items():
        assert got["train/loss"][step] == pytest.approx(loss, rel=1e-5)
    # Both ranks train on the same 2 windows of 64 tokens per step: counted once.
    assert got["train/tokens"][3] == ref["train/tokens"][3] == 4 * 2 * 64


def test_zero3_export_loads_in_transformers_with_the_one_process_logits(runs):
    ref_state, meta = read_checkpoint(runs / "one")
    reference = LlamaForCausalLM(LlamaConfig(**meta["model_args"]["hf_config"]))
    reference.load_state_dict(ref_state, strict=True)
    exported = AutoModelForCausalLM.from_pretrained(runs / "zero3" / "hf")
    ids = torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_data_and_sequence_parallel_together_equal_one_process(tmp_path, tokenizer_dir, forkserver):
    """4 processes, DeepSpeed ZeRO-2: 2 data-parallel groups x 2 ranks per window (each holding 16
    of 32 tokens). Group d reads windows d, d+2, ... (one per step), so a step trains on the two
    windows one process reads as two accumulated micro-batches, and the weights must be the same.
    DeepSpeed counts the step's 2 windows (`global_samples` in its checkpoint), not 4."""
    common = dict(trainer__max_steps=3, optim__min_lr_ratio=1.0, data__micro_batch_size=1,
                  trainer__save_every_n_steps=3)
    one = tiny_overrides(tmp_path / "one", tokenizer_dir, optim__accumulate_grad_batches=2, **common)
    both = tiny_overrides(tmp_path / "dp2sp2", tokenizer_dir, trainer__devices=4, strategy__name="deepspeed",
                          strategy__stage=2, strategy__sequence_parallel=2, **common)
    train_ok(forkserver, ["--synthetic", *one], tmp_path / "one-rank", timeout=900)
    train_ok(forkserver, ["--synthetic", *both], tmp_path / "dp2sp2-rank", world=4, timeout=900)
    ref, _ = read_checkpoint(tmp_path / "one")
    got, meta = read_checkpoint(tmp_path / "dp2sp2")
    assert meta["config"]["strategy"]["sequence_parallel"] == 2 and ref.keys() == got.keys()
    for k in ref:  # three AdamW steps at lr 3e-3 move weights by ~1e-2; float32 noise is ~1e-6
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-5, msg=k)
    states = torch.load(tmp_path / "dp2sp2" / "checkpoints" / "step-00000003.ckpt" / "checkpoint"
                        / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert states["global_samples"] == 3 * 2
