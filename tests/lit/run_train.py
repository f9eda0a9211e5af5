"""`python tests/lit/run_train.py [--synthetic] [--die-in-save STEP] [--sleep-in-step R:S:SEC] key=value ...`

Runs `longcpt.lit.train.train` as `longcpt train` does, on the recipe given as overrides, with the
real `longcpt.data` DataModule (or `--synthetic`: lit_helpers.SyntheticDataModule). Lightning
relaunches this same command for the other ranks.

`--die-in-save STEP` kills the process with SIGKILL in the middle of saving the checkpoint of
STEP: its temporary copy is fully written but not yet renamed into place. `--sleep-in-step
RANK:STEP:SECONDS` makes one rank hang at the start of an optimizer step.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_helpers import SyntheticDataModule  # noqa: E402

from longcpt.config import load_config  # noqa: E402
from longcpt.errors import LongcptError  # noqa: E402
from longcpt.lit import checkpoints  # noqa: E402
from longcpt.lit.train import train  # noqa: E402


def die_in_save(step: int) -> None:
    def die_before_commit(tmp, final, *args, **kwargs):
        if f"step-{step:08d}" in final.name:
            os.kill(os.getpid(), signal.SIGKILL)
        commit(tmp, final, *args, **kwargs)

    commit, checkpoints._commit = checkpoints._commit, die_before_commit


class SleepInStep(Callback):
    """Rank `rank` sleeps `seconds` at the start of optimizer step `step` (a hung rank)."""

    def __init__(self, spec: str):
        self.rank, self.step, self.seconds = (float(x) for x in spec.split(":"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            print(f"rank {trainer.global_rank} sleeping in step {trainer.global_step}", flush=True)
            time.sleep(self.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--die-in-save", type=int, default=None)
    parser.add_argument("--sleep-in-step", default=None, metavar="RANK:STEP:SECONDS")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(None, overrides, check_paths=not args.synthetic)
    if args.die_in_save is not None:
        die_in_save(args.die_in_save)
    dm = (SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size, cfg.trainer.seed,
                              sequence_parallel=cfg.strategy.sequence_parallel) if args.synthetic else None)
    extra = [SleepInStep(args.sleep_in_step)] if args.sleep_in_step else []
    try:
        result = train(cfg, datamodule=dm, callbacks=extra)
    except LongcptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"RESULT step={result.global_step} requeued={result.requeued} hf={result.hf_dir} "
          f"stopped_by={result.stopped_by}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
