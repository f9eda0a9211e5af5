"""Stopping a run cleanly: on a signal (SIGTERM, SLURM's requeue signal) or vanished training data,
at the next optimizer-step boundary and after a checkpoint (`StopAtStepBoundary`), and the SLURM
requeue (`request_requeue`). What a hung or dead rank does is `longcpt.lit.faults`';
docs/reliability.md lists every fault and what happens.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from longcpt import early_signals
from longcpt.errors import LongcptError
from longcpt.lit.checkpoints import RunCheckpoints


class StopAtStepBoundary(Callback):
    """Stop cleanly at the next optimizer-step boundary, checkpointing first, when a signal arrives
    or the training data vanished.

    * SIGTERM, what `scancel`, SLURM preemption, Kubernetes and most schedulers send before a
      SIGKILL (30 s later by default for both SLURM and Kubernetes): checkpoint, stop, exit 0.
      No requeue: a preempted SLURM job is requeued by SLURM itself, and `scancel` means stop.
    * Under SLURM, `requeue_signal` (SIGUSR1, sent by `sbatch --signal=USR1@600` ten minutes before
      the time limit; slurm/train.sbatch says how to size it: a step plus a checkpoint save): checkpoint, rank 0 runs `scontrol requeue $SLURM_JOB_ID` (array jobs
      included), stop, exit 0; the requeued job resumes.
    * The DataModule's `missing_data()` names a folder that is gone: checkpoint (every window
      trained on so far was read before it vanished), then `LongcptError` naming it.

    A requeue signal `longcpt train` recorded before this callback existed (`longcpt.early_signals`,
    during start-up) counts as received. Lightning's own handlers act inside the signal handler: its SLURM handler saves mid-step (with
    DeepSpeed, possibly mid-collective on some ranks), and its SIGTERM handler kills the other local
    ranks and exits without a checkpoint. Here the handlers only set a flag. They are installed in
    `on_train_start`, after Lightning has installed its own, and the previous ones come back at the
    end. After each optimizer step the ranks agree on the flags with one all-reduce (a signal may
    reach one rank only) and save through `RunCheckpoints` at that boundary, so the resumed run is
    exact.

    Args:
        checkpoints: the run's `RunCheckpoints` (runs before this callback: it may have saved).
        requeue_signal: the SLURM warning signal, or None outside SLURM.
    """

    def __init__(self, checkpoints: RunCheckpoints, requeue_signal: int | None = None):
        self.checkpoints = checkpoints
        self.requeue_signal = requeue_signal
        self.signals = {signal.SIGTERM: 0} | ({requeue_signal: 1} if requeue_signal is not None else {})
        self.flags = [False, False]  # [SIGTERM received, requeue signal received]
        self.requeued = False  # the requeue signal stopped the run and `scontrol requeue` succeeded
        self.requeue_failed = False  # it stopped the run, but the requeue failed: nothing resumes it
        self.stopped_by: str | None = None  # the signal's name once the run stopped for one
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.flags[self.signals[signum]] = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # From here on a signal is remembered (the requeue signal would otherwise end the process).
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)
        # `longcpt train` recorded the requeue signal since its first line: one that came during
        # start-up is acted on at the first step boundary.
        since = early_signals.take(self.requeue_signal) if self.requeue_signal is not None else None
        if since is not None:
            self.flags[1] = True
            rank_zero_info(f"{signal.Signals(self.requeue_signal).name} received during start-up ({since:.1f} s after "
                           "`longcpt train` began), before training: checkpointing at the first step boundary and "
                           "requeueing (a job whose --time is not longer than its --signal lead gets it at every start)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has meanwhile wrapped ours in its own SIGTERM handler: take it back.
        for signum in self.signals:
            signal.signal(signum, self._handler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # RunCheckpoints runs first (callbacks run in list order) and may already have saved.
        # Every rank reaches the same boundaries, so the all-reduce below is matched everywhere.
        if self.stopped_by or not self.checkpoints.just_stepped:
            return
        missing = getattr(trainer.datamodule, "missing_data", lambda: None)()
        local = torch.tensor([*self.flags, missing is not None], dtype=torch.float32, device=pl_module.device)
        term, requeue, vanished = (bool(x) for x in trainer.strategy.reduce(local, reduce_op="sum") > 0)
        if not (term or requeue or vanished):
            return
        step = trainer.global_step
        self.stopped_by = "SIGTERM" if term else signal.Signals(self.requeue_signal).name if requeue else None
        why = "the training data vanished" if vanished else f"{self.stopped_by} received"
        rank_zero_info(f"{why}: checkpointing step {step} and stopping")
        if self.checkpoints.saved_step != step:
            self.checkpoints.save(trainer)
        if vanished:
            what = missing or "a data folder (seen by another rank)"
            raise LongcptError(f"{what} vanished during the run (noticed after step {step}); checkpoint "
                               f"step {step} was saved first, so nothing is lost. Restore the folder and run "
                               "the same command to resume from it.")
        if not term:  # the requeue is reported as it went: a failed `scontrol requeue` is not success
            requeued = request_requeue() if trainer.is_global_zero else False
            self.requeued = bool(trainer.strategy.broadcast(requeued))
            self.requeue_failed = not self.requeued
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
