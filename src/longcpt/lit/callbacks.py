"""Training callbacks: atomic checkpoints, SLURM requeue, metrics, and progress output.

Checkpoint layout (docs/reference.md, section 4), under `out_dir/checkpoints/`:

    step-00000050.ckpt    a Lightning checkpoint file, or a DeepSpeed folder of the same name
    step-00000100.ckpt
    last -> step-00000100.ckpt     relative symlink, replaced atomically

A checkpoint is written to a hidden temporary name (`.step-00000100.ckpt.tmp`), flushed to disk,
and renamed into place; only then does `last` move to it and are the oldest ones beyond
`keep_last_k` deleted. A crash at any moment therefore leaves `last` pointing at a whole
checkpoint (the official AnchorContext training code deletes the previous checkpoint before
writing the next one, so a crash there loses both), and a relaunch resumes from the newest `step-*.ckpt`, which is
always whole. Checkpoints are only taken at optimizer-step boundaries, so a resumed run continues
with exactly the next micro-batch.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from longcpt.lit.module import batch_stats
from longcpt.model.infini import gate_stats

CHECKPOINT_RE = re.compile(r"^step-(\d+)\.ckpt$")
LAST = "last"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` as (step, path), oldest first (temporaries excluded)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint to resume from: the newest complete one in `folder`, or None.

    Only complete checkpoints ever carry a `step-*.ckpt` name, so this is `last` except after a
    crash between renaming a checkpoint into place and moving `last` to it.
    """
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file under a folder, to disk before it is renamed into place."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _point_last(folder: Path, name: str) -> None:
    tmp = folder / f".{LAST}.tmp"
    _remove(tmp)
    os.symlink(name, tmp)  # relative: the run folder can be moved or copied
    os.replace(tmp, folder / LAST)


class RunCheckpoints(Callback):
    """Save every `every_n_steps` optimizer steps and at the end; keep the newest `keep_last_k`.

    Args:
        folder: `out_dir/checkpoints`.
        every_n_steps: optimizer steps between checkpoints.
        keep_last_k: complete checkpoints kept (the one `last` points to is never removed).
    """

    def __init__(self, folder: str | os.PathLike, every_n_steps: int, keep_last_k: int):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.keep_last_k = keep_last_k
        self.saved_step: int | None = None
        self.just_stepped = False  # did the current micro-batch complete an optimizer step?
        self._seen_step: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".*.tmp"):  # left by a run killed while saving
                _remove(stale)
        trainer.strategy.barrier("longcpt.checkpoints.start")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the restored step is already on disk.
        self._seen_step = trainer.global_step
        self.saved_step = trainer.global_step if trainer.global_step > 0 else None

    def stepped(self, trainer: pl.Trainer) -> bool:
        """True once per optimizer step, on the micro-batch that completed it."""
        if trainer.global_step == self._seen_step:
            return False
        self._seen_step = trainer.global_step
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.just_stepped = self.stepped(trainer)
        if self.just_stepped and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path:
        """Write the checkpoint of the current step (all ranks call this) and move `last` to it."""
        step = trainer.global_step
        name = checkpoint_name(step)
        final, tmp = self.folder / name, self.folder / f".{name}.tmp"
        # A complete checkpoint of this very step is never replaced (a swap would leave a moment
        # with none); runs resume from the newest step, so it holds this same state.
        if trainer.strategy.broadcast(final.exists()):
            rank_zero_warn(f"{final} exists already; keeping it")
        else:
            if trainer.is_global_zero:
                _remove(tmp)
            trainer.strategy.barrier("longcpt.checkpoint.begin")
            t0 = time.perf_counter()
            trainer.save_checkpoint(tmp, weights_only=False)  # collective for DeepSpeed; rank 0 writes for the others
            trainer.strategy.barrier("longcpt.checkpoint.written")
            if trainer.is_global_zero:
                _fsync_tree(tmp)
                os.replace(tmp, final)
                rank_zero_info(f"checkpoint {final} ({time.perf_counter() - t0:.1f}s)")
        if trainer.is_global_zero:
            _point_last(self.folder, name)
            self._prune(keep=final)
        trainer.strategy.barrier("longcpt.checkpoint.done")
        self.saved_step = step
        return final

    def _prune(self, keep: Path) -> None:
        complete = [p for _, p in list_checkpoints(self.folder)]
        for path in complete[: max(0, len(complete) - self.keep_last_k)]:
            if path != keep:
                _remove(path)


class SlurmRequeue(Callback):
    """On the SLURM warning signal: checkpoint at the next step boundary, requeue, stop cleanly.

    `sbatch --signal=USR1@120` sends SIGUSR1 two minutes before the time limit. Lightning's own
    auto-requeue handler saves from inside the signal handler, i.e. in the middle of a step and,
    with DeepSpeed, possibly in the middle of a collective on some ranks and not others. Here the
    handler only sets a flag; the ranks agree on it after each micro-batch (one all-reduce) and
    save through `RunCheckpoints` at the next optimizer-step boundary, so the requeued job
    resumes exactly. Rank 0 then runs `scontrol requeue $SLURM_JOB_ID` (array jobs included).

    Args:
        checkpoints: the run's `RunCheckpoints` callback.
        signum: the signal to handle.
    """

    def __init__(self, checkpoints: RunCheckpoints, signum: int = signal.SIGUSR1):
        self.checkpoints = checkpoints
        self.signum = signum
        self.received = False
        self.requeued = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.received = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # RunCheckpoints runs first (callbacks run in list order) and may already have saved.
        # Every rank reaches the same boundaries, so the all-reduce below is matched everywhere.
        if self.requeued or not self.checkpoints.just_stepped:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        rank_zero_info(f"requeue signal received: checkpointing step {trainer.global_step} and requeueing")
        if self.checkpoints.saved_step != trainer.global_step:
            self.checkpoints.save(trainer)
        if trainer.is_global_zero:
            request_requeue()
        self.requeued = True
        trainer.should_stop = True


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def request_requeue() -> bool:
    """`scontrol requeue <job>`; True on success (a failure is reported, never fatal)."""
    job = slurm_job_id()
    if job is None or not re.fullmatch(r"[0-9_]+", job):
        rank_zero_warn(f"cannot requeue: SLURM_JOB_ID={job!r} is not a SLURM job id")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn("cannot requeue: `scontrol` is not on PATH")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
        return False
    rank_zero_info(f"requeued SLURM job {job}")
    return True


class TrainMetrics(Callback):
    """Log tokens/s, padding fraction, learning rate(s), gradient norm and, for Infini models, the
    distribution of the per-head memory gates sigmoid(gate) (`train/gate/mean`, `std`, `min`,
    `max`, `memory_heads`: gates that never move are the classic failure of Infini-attention training).

    Tokens/s counts every position of every micro-batch on every rank (input_ids.numel() times the
    world size: packed windows have the same shape on all ranks), over a sliding window of the
    last `window` micro-batches. The padding fraction is the share of positions whose label is
    -100 (padding and the last token of each document).

    Args:
        window: micro-batches in the tokens/s window.
    """

    def __init__(self, window: int = 20):
        self.window = deque(maxlen=window + 1)
        self.tokens_total = 0

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
        self.tokens_total += tokens * trainer.world_size
        self.window.append((time.perf_counter(), self.tokens_total))
        (t0, n0), (t1, n1) = self.window[0], self.window[-1]
        if t1 > t0:
            pl_module.log("train/tokens_per_s", (n1 - n0) / (t1 - t0), prog_bar=True)
        pl_module.log("train/padding", padding)
        pl_module.log("train/tokens", float(self.tokens_total))
        for key, value in gate_stats(pl_module.model).items():
            pl_module.log(f"train/{key}", value)
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None and engine.get_global_grad_norm() is not None:
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
        gates = (  # Infini models: the memory gates' range, the first thing to watch
            f"  gate {m['train/gate/mean']:.3f} [{m['train/gate/min']:.3f}, {m['train/gate/max']:.3f}]"
            if "train/gate/mean" in m
            else ""
        )
        print(
            f"step {step}/{trainer.max_steps}  loss {m.get('train/loss', float('nan')):.4f}  "
            f"lr {m.get('train/lr', float('nan')):.2e}  tok/s {m.get('train/tokens_per_s', 0):,.0f}{gates}  "
            f"elapsed {elapsed:.0f}s  eta {eta:.0f}s",
            file=sys.stdout,
            flush=True,
        )
