"""What a training run reports while it runs: metrics logged every step (`TrainMetrics`), and the
console: a progress bar on a terminal (`ProgressBar`), one plain line every few steps otherwise
(`StepPrinter`, for SLURM and CI logs).
"""

from __future__ import annotations

import sys
import time
from collections import deque

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

from longcpt.lit.module import batch_stats
from longcpt.model.attention import kind_spec
from longcpt.strategies import data_parallel_coordinates


class TrainMetrics(Callback):
    """Log tokens/s, padding fraction, learning rate(s), gradient norm and what the attention kind's
    `metrics` hook reports (Infini-attention: the distribution of its memory gates, `train/gate/*`).

    Tokens/s counts every position of every micro-batch on every data-parallel rank
    (input_ids.numel() times the world size divided by `strategy.sequence_parallel`, whose ranks
    share a window: packed windows have the same shape on all ranks), over a sliding window of the
    last `window` micro-batches. The padding fraction is the share of positions whose label is
    -100 (padding and the last token of each document).

    Args:
        window: micro-batches in the tokens/s window.
    """

    def __init__(self, window: int = 20):
        self.window = deque(maxlen=window + 1)
        self.tokens_total = 0
        self._norm_step: int | None = None  # the optimizer step whose DeepSpeed grad norm was logged

    def on_train_start(self, trainer, pl_module) -> None:
        self._norm_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.window:
            self.window.append((time.perf_counter(), 0))
        # Before the scheduler steps: the learning rate this micro-batch trains with.
        for group in trainer.optimizers[0].param_groups:
            name = group.get("name", "decay")
            if name != "no_decay":
                pl_module.log("train/lr" if name == "decay" else f"train/lr_{name}", group["lr"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if grads:  # DeepSpeed keeps gradients partitioned (None here): see on_train_batch_end
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            pl_module.log("train/grad_norm", norm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens, padding = batch_stats(batch)
        sequence_parallel = pl_module.cfg.strategy.sequence_parallel
        self.tokens_total += tokens * data_parallel_coordinates(trainer.global_rank, trainer.world_size,
                                                                sequence_parallel)[1]
        self.window.append((time.perf_counter(), self.tokens_total))
        (t0, n0), (t1, n1) = self.window[0], self.window[-1]
        if t1 > t0:
            pl_module.log("train/tokens_per_s", (n1 - n0) / (t1 - t0), prog_bar=True)
        pl_module.log("train/padding", padding)
        pl_module.log("train/tokens", float(self.tokens_total))
        metrics = kind_spec(pl_module.cfg.attention.kind).hooks.metrics
        for key, value in (metrics(pl_module.model) if metrics is not None else {}).items():
            pl_module.log(f"train/{key}", value)
        # DeepSpeed's norm is the last optimizer step's: log it on the micro-batch that completed
        # that step only (on the others of an accumulation it would be the previous step's).
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None and trainer.global_step != self._norm_step:
            self._norm_step = trainer.global_step
            if engine.get_global_grad_norm() is not None:
                pl_module.log("train/grad_norm", float(engine.get_global_grad_norm()))


class ProgressBar(RichProgressBar):
    """Rich progress bar over the run's micro-batches (elapsed, remaining) with loss and tokens/s."""

    SHORT = {"train/loss": "loss", "train/tokens_per_s": "tok/s", "val/loss": "val"}

    @property
    def total_train_batches(self) -> int | float:
        # The stream is endless: the run ends at max_steps (the default bar shows Lightning epochs).
        t = self.trainer
        return min(t.num_training_batches, t.max_steps * t.accumulate_grad_batches)

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        shown = {self.SHORT[k]: v for k, v in items.items() if k in self.SHORT}
        if "tok/s" in shown:
            shown["tok/s"] = f"{shown['tok/s']:,.0f}"
        return shown


class StepPrinter(Callback):
    """One plain line every `every` steps, for logs that are not a terminal (SLURM, CI).

    Args:
        every: optimizer steps between lines.
    """

    def __init__(self, every: int):
        self.every = every
        self._start: float | None = None
        self._start_step = 0
        self._seen = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._seen or step % self.every:
            return
        self._seen = step
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        elapsed = time.perf_counter() - self._start
        done = step - self._start_step
        eta = elapsed / done * (trainer.max_steps - step) if done else float("nan")
        progress = kind_spec(pl_module.cfg.attention.kind).hooks.progress
        extra = progress(m) if progress is not None else ""  # the kind's own figures (Infini: its gates)
        print(
            f"step {step}/{trainer.max_steps}  loss {m.get('train/loss', float('nan')):.4f}  "
            f"lr {m.get('train/lr', float('nan')):.2e}  tok/s {m.get('train/tokens_per_s', 0):,.0f}{extra}  "
            f"elapsed {elapsed:.0f}s  eta {eta:.0f}s",
            file=sys.stdout,
            flush=True,
        )
