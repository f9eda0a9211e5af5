"""The SLURM requeue signal, recorded from the first line of `longcpt train` until training can act on it.

SLURM sends SIGUSR1 (`sbatch --signal=USR1@LEAD`) LEAD seconds before the time limit. The training
loop's stop callback turns it into a checkpoint and a requeue, but it only exists once the model is
built and the ranks are connected, which takes minutes for a large model. Until then SIGUSR1 keeps
its default action, which ends the process: every rank died (`srun: error: tasks 0-1: User defined
signal 1`) with no checkpoint and no requeue, whenever the signal came during start-up (a job whose
--time is not longer than its lead gets it at once).

So `longcpt train` calls `record()` before its heavy imports: from then on a SIGUSR1 is only noted.
The stop callback calls `take()` when it installs its own handler and acts on a recorded signal at
the first step boundary, like one received during training. After training the callback puts the
recording handler back, so a late SIGUSR1 (during an export) is absorbed instead of killing the
process. Outside SLURM nothing acts on SIGUSR1: `release()` restores its default action and delivers
a signal recorded meanwhile, which then acts as it would have without `record()`.

Standard library only: imported by `longcpt.cli` before anything else.
"""

from __future__ import annotations

import os
import signal
import time

REQUEUE_SIGNAL = signal.SIGUSR1

_received: dict[int, float] = {}  # signal -> time.monotonic() of its first arrival since record()
_recorded_since: dict[int, float] = {}  # signal -> time.monotonic() when record() installed the handler
_previous: dict[int, object] = {}  # signal -> the disposition record() replaced


def _note(signum, frame) -> None:
    _received.setdefault(signum, time.monotonic())


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def record(signum: int = REQUEUE_SIGNAL) -> None:
    """From now on, `signum` arriving is only noted (for `take`), not acted on."""
    if signum not in _previous:
        _previous[signum] = signal.signal(signum, _note)
        _recorded_since[signum] = time.monotonic()


def take(signum: int = REQUEUE_SIGNAL) -> float | None:
    """Seconds between `record()` and the first arrival of `signum`, if it arrived since; forgets it.

    Returns:
        None when `signum` did not arrive (or was never recorded).
    """
    arrived = _received.pop(signum, None)
    return None if arrived is None else arrived - _recorded_since[signum]


def release(signum: int = REQUEUE_SIGNAL) -> None:
    """Undo `record`: the previous disposition comes back, and a signal that arrived meanwhile is
    delivered again so that it acts as it would have (by default, ending the process)."""
    if signum not in _previous:
        return
    signal.signal(signum, _previous.pop(signum))
    _recorded_since.pop(signum, None)
    if _received.pop(signum, None) is not None:
        signal.raise_signal(signum)
