"""`train` with `model.lora`, in process on synthetic data: what a checkpoint holds, exact resume,
refusals, and the dtypes of frozen and trained weights."""

from __future__ import annotations

import pytest
import torch
from lit_helpers import SyntheticDataModule, read_metrics, tiny_overrides

import longcpt
from longcpt.config import load_config
from longcpt.data import load_tokenizer
from longcpt.errors import LongcptError
from longcpt.lit.train import build_model, train
from longcpt.model import CausalLM, ModelArgs

LORA = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.1",
        "model.lora.trainable=[embed_tokens,norm,post_attention_layernorm]"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(7)
    args = ModelArgs.from_hf_config({"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "max_position_embeddings": 256})
    return longcpt.save_pretrained(CausalLM(args), tmp_path_factory.mktemp("lora_base") / "base")


def recipe(out, tokenizer_dir, base, *extra, steps=6):
    # Constant learning rate after warmup, so that a run stopped early follows the same schedule.
    overrides = tiny_overrides(out, tokenizer_dir, model__pretrained=str(base), attention__kind="s2",
                               attention__group_size=8, trainer__max_steps=steps, optim__min_lr_ratio=1.0)
    return load_config(None, [*overrides, *LORA, *extra])


def run(cfg):
    return train(cfg, datamodule=SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size, restart=True))


def last(out):
    return torch.load(out / "checkpoints" / "last", weights_only=False)


def test_checkpoints_hold_the_trained_tensors_and_resume_exactly(tmp_path, tokenizer_dir, base):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run(recipe(ref_dir, tokenizer_dir, base))
    ckpt = last(ref_dir)
    model = build_model(recipe(ref_dir, tokenizer_dir, base), load_tokenizer(str(tokenizer_dir)))
    trained = {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trained  # adapters, embed_tokens, norms: no frozen weight
    assert any(".lora_A." in k for k in trained) and "model.model.embed_tokens.weight" in trained
    assert not any("base_layer" in k or "mlp" in k for k in ckpt["state_dict"])
    assert ckpt["longcpt"]["lora"]["settings"]["trainable"] == ["embed_tokens", "norm", "post_attention_layernorm"]
    assert ckpt["longcpt"]["lora"]["base"] == str(base.resolve())

    run(recipe(run_dir, tokenizer_dir, base, steps=4))  # stopped after step 4, then launched again
    result = run(recipe(run_dir, tokenizer_dir, base))
    assert result.global_step == 6
    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    for step in (4, 5):
        assert got["train/loss"][step] == ref["train/loss"][step], step
    a, b = ckpt["state_dict"], last(run_dir)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["model.model.norm.weight"], torch.ones(64))  # trained, not the init


def test_resuming_with_other_settings_is_refused(tmp_path, tokenizer_dir, base):
    out = tmp_path / "run"
    run(recipe(out, tokenizer_dir, base, steps=2))
    with pytest.raises(LongcptError, match="trained with model.lora=.*'r': 4.*this recipe has.*'r': 8.*trainer.resume=false"):
        run(recipe(out, tokenizer_dir, base, "model.lora.r=8", steps=4))
    with pytest.raises(LongcptError, match="written by LoRA training and this recipe has no model.lora"):
        run(recipe(out, tokenizer_dir, base, "model.lora=null", steps=4))


@pytest.mark.parametrize("precision, frozen, trained", [("bf16-mixed", torch.bfloat16, torch.float32),
                                                        ("32-true", torch.float32, torch.float32)])
def test_frozen_weights_are_held_in_the_training_precision(tokenizer_dir, base, tmp_path, precision, frozen, trained):
    cfg = recipe(tmp_path, tokenizer_dir, base, f"trainer.precision={precision}")
    model = build_model(cfg, load_tokenizer(str(tokenizer_dir)))
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {frozen}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {trained}
