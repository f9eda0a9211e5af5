"""Hung or dead ranks: the collective-timeout error turned into one message, and a bounded requeue.

Every multi-process strategy gets `trainer.timeout_minutes` as its process-group timeout
(`longcpt.strategies.build_strategy`), so a rank that hangs (a stuck file read, a deadlocked data
worker, a GPU fault) or dies makes the collectives of the other ranks fail instead of waiting
forever. Over gloo that is an exception in the waiting ranks: "Timed out waiting 1800000ms for recv
operation" after the timeout, or "Connection closed by peer" at once when the other process died.
`rank_failure` recognises these and `train` raises instead one `RankFailureError` naming this rank,
the step and what to do. (Over NCCL, torch's watchdog ends the process after the same timeout with
its own message naming the rank and the collective.)

No checkpoint can be written at that point (saving is itself collective), so the run resumes from
its last checkpoint. Under SLURM the job is requeued, as for preemption, at most
`trainer.max_restarts` times per job: each fault requeue leaves one file
`out_dir/restarts/<job id>-<SLURM_RESTART_COUNT>.json` (created exclusively, so the several ranks that
see the same fault requeue once) saying when, where and why.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from longcpt.errors import LongcptError

RESTARTS_DIR = "restarts"


class RankFailureError(LongcptError):
    """A collective failed because another rank hung or died."""


def rank_failure(error: BaseException) -> str | None:
    """"timed out" or "lost" when `error` is a collective failing because of another rank, else None."""
    import torch.distributed as dist

    text = str(error)
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in text)):
        return None
    return "timed out" if ("imed out" in text or "Timeout" in text) else "lost"


def failure_message(kind: str, rank: int, step: int, timeout_minutes: float, error: BaseException) -> str:
    """What happened at which rank and step (the caller adds what happens next)."""
    detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if "] " in detail:  # drop gloo's source-file prefix
        detail = detail.split("] ", 1)[1]
    if kind == "timed out":
        return (f"rank {rank}: a collective operation waited trainer.timeout_minutes={timeout_minutes:g} for the "
                f"other ranks at step {step} and timed out: another rank is hung, dead or far slower ({detail})")
    return f"rank {rank}: lost contact with another rank at step {step}: its process died or was killed ({detail})"


def requeue_after_fault(out_dir: Path, max_restarts: int, rank: int, step: int, message: str) -> str:
    """Under SLURM, requeue the job unless `max_restarts` fault requeues of it were used; say which.

    Returns:
        The sentence to append to the error message.
    """
    from longcpt.lit.stopping import request_requeue, slurm_job_id

    job = slurm_job_id()
    if job is None:
        return "Run the same command to resume from the last checkpoint."
    folder = Path(out_dir) / RESTARTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{job}-{os.environ.get('SLURM_RESTART_COUNT', '0')}.json"
    being = f"SLURM job {job} is being requeued (by another rank); it resumes from the last checkpoint."
    if marker.exists():
        return being
    used = len(list(folder.glob(f"{job}-*.json")))
    if used >= max_restarts:
        return (f"Not requeued: the {used} fault restart(s) of SLURM job {job} reached trainer.max_restarts="
                f"{max_restarts}; resubmit the job (it resumes from the last checkpoint) once the node is fixed.")
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another rank got there first
        return being
    with os.fdopen(fd, "w") as f:
        json.dump({"job": job, "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "rank": rank,
                   "step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "error": message}, f, indent=2)
    if not request_requeue():
        marker.unlink(missing_ok=True)
        return "Requeueing the SLURM job failed (see the warning above); resubmit it to resume."
    return (f"Requeued SLURM job {job} (fault restart {used + 1} of trainer.max_restarts={max_restarts}); "
            "it resumes from the last checkpoint.")
