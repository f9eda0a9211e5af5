"""The LightningModule: loss wiring, the non-finite guard, checkpoint metadata."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lit_helpers import SyntheticDataModule, collate, tiny_overrides, window

from longcpt.config import load_config
from longcpt.data import load_tokenizer
from longcpt.lit.module import LitCausalLM, NonFiniteLossError, batch_stats
from longcpt.lit.train import build_model


def make_module(tmp_path: Path, tokenizer_dir: Path, **extra) -> LitCausalLM:
    cfg = load_config(None, tiny_overrides(tmp_path / "run", tokenizer_dir, **extra))
    torch.manual_seed(0)
    model = build_model(cfg, load_tokenizer(str(tokenizer_dir)))
    return LitCausalLM(model, cfg, tokenizer_dir=str(tokenizer_dir))


def test_model_from_recipe_uses_tokenizer_ids(tmp_path, tokenizer_dir):
    module = make_module(tmp_path, tokenizer_dir, trainer__activation_checkpointing="true")
    args = module.model.args
    assert (args.vocab_size, args.bos_token_id, args.eos_token_id, args.pad_token_id) == (96, 1, 2, 0)
    assert (args.hidden_size, args.num_hidden_layers, args.attention) == (64, 2, "full")
    assert module.model.activation_checkpointing


def test_batch_stats_counts_ignored_labels():
    batch = collate([window(0, 32, 0), window(1, 32, 0)])
    tokens, padding = batch_stats(batch)
    assert tokens == 64
    assert padding == pytest.approx(float((batch["labels"] == -100).sum()) / 64)
    assert 0 < padding < 1


def test_metadata_rebuilds_the_model(tmp_path, tokenizer_dir):
    from longcpt.model.config import ModelArgs

    module = make_module(tmp_path, tokenizer_dir)
    meta = module.checkpoint_metadata()
    assert ModelArgs(**meta["model_args"]) == module.model.args
    assert meta["precision"] == "32-true" and meta["tokenizer"] == str(tokenizer_dir)
    assert meta["config"]["trainer"]["max_steps"] == 6


class Poison(pl.Callback):
    """Turns the embedding to NaN before the micro-batch of optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.model.embed_tokens.weight.fill_(float("nan"))


def test_nonfinite_loss_stops_naming_step_and_saves_batch(tmp_path, tokenizer_dir):
    module = make_module(tmp_path, tokenizer_dir)
    before = None

    class Remember(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            nonlocal before
            before = {k: v.clone() for k, v in batch.items()}

    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[Remember(), Poison(3)], use_distributed_sampler=False)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(module, datamodule=SyntheticDataModule(32, 2, val=False))
    message = str(err.value)
    assert "at step 3" in message and "optim.lr" in message
    saved = Path(module.cfg.trainer.out_dir) / "nonfinite" / "step-00000003-rank0.pt"
    assert str(saved) in message
    batch = torch.load(saved)
    assert set(batch) == set(before) and all(torch.equal(batch[k], before[k]) for k in batch)
    assert trainer.global_step == 3  # no update with the NaN gradient


def test_loss_is_next_token_cross_entropy(tmp_path, tokenizer_dir):
    module = make_module(tmp_path, tokenizer_dir)
    batch = collate([window(3, 32, 0), window(4, 32, 0)])
    expected = module.model.loss(batch["input_ids"], batch["labels"], batch["position_ids"], batch["cu_seqlens"])
    # Plain next-token cross-entropy over the non-ignored labels, from the logits.
    logits = module.model(batch["input_ids"])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(expected, ref, rtol=1e-5, atol=1e-6)
    # And the batch the LightningModule feeds it is that batch: its training step returns the same loss.
    torch.testing.assert_close(module._loss(batch), expected)


def test_model_fused_kernels_are_applied_when_training_builds_the_model(tmp_path, tokenizer_dir, monkeypatch):
    """model.fused_kernels=liger reaches every block (Liger's kernels replaced by eager stand-ins on a CPU)."""
    from tiny import eager_fused_kernels

    from longcpt.model import fused

    calls = {"norm": 0, "mlp": 0}
    monkeypatch.setattr(fused, "liger_functions", lambda: eager_fused_kernels(calls))
    module = make_module(tmp_path, tokenizer_dir, model__fused_kernels="liger", trainer__accelerator="gpu")
    module.model.loss(torch.randint(3, 96, (1, 16)), torch.randint(3, 96, (1, 16)))
    assert calls == {"norm": 2 * 2 + 1, "mlp": 2}
