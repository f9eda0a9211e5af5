"""The LightningModule: a thin wrapper that feeds packed batches to `CausalLM.loss`.

Everything worth testing lives elsewhere and runs without a Trainer: the model (`longcpt.model`),
the optimizer groups and schedule (`longcpt.lit.optim`), the batch statistics and the non-finite
guard below. Batches come from `longcpt.data` as `{"input_ids", "labels", "position_ids",
"cu_seqlens"}` with labels already aligned (labels[t] is the target of token t, -100 ignored).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

import longcpt
from longcpt.batch import IGNORE_INDEX
from longcpt.config import Config
from longcpt.errors import LongcptError
from longcpt.lit.optim import build_optimizer
from longcpt.model.attention.ulysses import SequenceParallel
from longcpt.model.compile import compile_model, compile_report, mark_dynamic
from longcpt.model.llama import CausalLM
from longcpt.strategies import sequence_parallel_group

# Key of our metadata inside every checkpoint (Lightning .ckpt and DeepSpeed client state).
CHECKPOINT_KEY = "longcpt"


class NonFiniteLossError(LongcptError):
    """The training loss became NaN or infinite; the message names the step and the saved batch."""


def batch_stats(batch: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(tokens in the batch, share of positions without a target: padding and document ends)."""
    labels = batch["labels"]
    return batch["input_ids"].numel(), (labels == IGNORE_INDEX).float().mean().item()


def save_batch(batch: dict[str, Any], path: Path) -> Path:
    """Write a batch's tensors (on CPU) to `path` atomically, for post-mortem inspection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    cpu = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
    torch.save(cpu, tmp)
    tmp.replace(path)
    return path


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class LitCausalLM(pl.LightningModule):
    """Loss, logging, optimizer and checkpoint metadata around a `CausalLM`.

    Args:
        model: the model to train, or a function that builds it in `configure_model` (Lightning
            calls that hook inside `deepspeed.zero.Init` under ZeRO-3, so the model is built
            partitioned: `longcpt.strategies.builds_partitioned`).
        cfg: the resolved recipe.
        tokenizer_dir: tokenizer folder recorded in checkpoints (export copies it).
    """

    def __init__(self, model: CausalLM | Callable[[], CausalLM], cfg: Config, tokenizer_dir: str | None = None):
        super().__init__()
        self.model = model if isinstance(model, CausalLM) else None
        self._build_model = None if isinstance(model, CausalLM) else model
        self.cfg = cfg
        self.tokenizer_dir = tokenizer_dir
        self._sequence_parallel: SequenceParallel | None = None
        self._compiled = False
        self._first_step_started: float | None = None
        # LoRA checkpoints hold the trained parameters only; `on_load_checkpoint` checks them instead.
        self.strict_loading = cfg.model.lora is None
        self._lora_record: dict[str, Any] | None = None
        self._resumed_rng: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """Under `strategy.sequence_parallel`, make this rank's group (torch.distributed is up now)."""
        n = self.cfg.strategy.sequence_parallel
        if n > 1 and self._sequence_parallel is None:
            group = sequence_parallel_group(n, timeout_minutes=self.cfg.trainer.timeout_minutes)
            self._sequence_parallel = SequenceParallel.of(group)

    def configure_model(self) -> None:
        """Build the model if it was deferred; give it its sequence-parallel group; compile it
        (`trainer.compile`, once: the blocks are compiled in place).

        Every rank of a group receives the same whole-window batch (the DataModule shards data by
        group); the model keeps its T/N tokens and returns the window's loss.
        """
        if self.model is None:
            self.model = self._build_model()
        if self._sequence_parallel is not None:
            self.model.sequence_parallel = self._sequence_parallel
        if not self._compiled:
            compile_model(self.model, self.cfg.trainer.compile)
            self._compiled = True

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cu_seqlens = batch.get("cu_seqlens")
        if self.cfg.trainer.compile != "none":
            mark_dynamic(cu_seqlens)  # a new document layout reuses the compiled code
        return self.model.loss(batch["input_ids"], batch["labels"], batch.get("position_ids"), cu_seqlens)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Start the first step's clock (`trainer.compile`'s report). The first step after a resume
        starts from the saved random state: restoring it at load time is not enough, as starting the
        data loader's iterator draws a seed from torch's generator (`torch.utils.data`), so dropout
        (LoRA's, say) would draw other masks than the uninterrupted run."""
        if self._resumed_rng is not None:
            set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        if self._first_step_started is None:
            self._first_step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """After the first step, say once what torch.compile did (graphs, graph breaks and their
        cause, recompilations, the inductor cache) and how long that step took."""
        if self.cfg.trainer.compile == "none" or self._first_step_started is None or self._first_step_started < 0:
            return
        if self.trainer.is_global_zero:
            seconds = time.perf_counter() - self._first_step_started
            print(f"trainer.compile={self.cfg.trainer.compile}: first step {seconds:.1f} s; "
                  f"{compile_report().summary()}", flush=True)
        self._first_step_started = -1.0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self._stop_if_not_finite(loss, batch, batch_idx)
        self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        # Weighted by target tokens, so the epoch value is the token-level mean.
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        self.log("val/loss", loss, batch_size=max(n, 1), sync_dist=True, prog_bar=True)

    def _stop_if_not_finite(self, loss: torch.Tensor, batch: dict, batch_idx: int) -> None:
        """Raise `NonFiniteLossError` on every rank when any rank's loss is NaN/inf.

        Checked before the backward so no non-finite update reaches the weights; all ranks decide
        together so none is left waiting in a collective.
        """
        bad = not bool(torch.isfinite(loss.detach()).item())
        if not self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        step, rank = self.trainer.global_step, self.trainer.global_rank
        folder = Path(self.cfg.trainer.out_dir) / "nonfinite"
        if bad:
            path = save_batch(batch, folder / f"step-{step:08d}-rank{rank}.pt")
            where = f"the offending batch is saved in {path}"
        else:
            where = f"another rank's loss was not finite; its batch is saved under {folder}"
        raise NonFiniteLossError(
            f"training loss is {loss.item()} at step {step} (micro-batch {batch_idx}, rank {rank}); "
            f"{where}. Fix: lower optim.lr, keep optim.grad_clip > 0, or inspect that batch; "
            "the last good checkpoint is in checkpoints/last."
        )

    def configure_optimizers(self):
        s = self.cfg.strategy
        offload = s.name == "deepspeed" and s.offload_optimizer
        optimizer, scheduler = build_optimizer(self.model, self.cfg.optim, self.cfg.trainer.max_steps, offload)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def checkpoint_metadata(self) -> dict[str, Any]:
        """What `longcpt export` needs to rebuild the model from a checkpoint without the recipe
        (with LoRA: the section, the base folder and its fingerprint, `longcpt.lora.adapters.record`)."""
        return {
            "model_args": dataclasses.asdict(self.model.args),
            "precision": self.cfg.trainer.precision,
            "tokenizer": self.tokenizer_dir,
            "config": dataclasses.asdict(self.cfg),
            "lora": self._lora(),
            "version": longcpt.__version__,
        }

    def _lora(self) -> dict[str, Any] | None:
        if self.cfg.model.lora is not None and self._lora_record is None:
            from longcpt.lora.adapters import record

            self._lora_record = record(self.cfg.model.lora, self.cfg.model.pretrained)
        return self._lora_record

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_metadata()
        checkpoint["rng"] = rng_state()
        if self.cfg.model.lora is not None and "state_dict" in checkpoint:  # DeepSpeed leaves its frozen ones out itself
            from longcpt.lora.adapters import trained_names

            keep = {f"model.{name}" for name in trained_names(self.model)}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from longcpt.lora.adapters import check_resume, trained_names

        meta = checkpoint.get(CHECKPOINT_KEY, {})
        expected = None
        if self.cfg.model.lora is not None:
            expected = {f"model.{name}" for name in trained_names(self.model)}
        check_resume(meta.get("lora"), self.cfg.model.lora, self.cfg.model.pretrained,
                     set(checkpoint["state_dict"]) if "state_dict" in checkpoint else None, expected)
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
            self._resumed_rng = checkpoint["rng"]
