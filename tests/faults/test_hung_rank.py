"""A hung rank: with trainer.timeout_minutes as the process-group timeout, the other rank fails soon
after the timeout with one message naming its rank and the step, instead of waiting forever; under
SLURM the job is requeued, at most trainer.max_restarts times."""

import json
import os
import re
import time

import pytest
from lit_helpers import fake_scontrol, tiny_overrides

from longcpt.lit.faults import requeue_after_fault

TIMEOUT_S = 6


@pytest.mark.slow
def test_two_processes_one_sleeps_in_a_step(forkserver, tmp_path, tokenizer_dir):
    """Two CPU processes started together (as srun or torchrun start them); rank 1 sleeps 10 minutes
    at the start of step 3."""
    out = tmp_path / "run"
    args = ["--synthetic", "--sleep-in-step", "1:3:600",
            *tiny_overrides(out, tokenizer_dir, trainer__devices=2, strategy__name="ddp",
                            trainer__timeout_minutes=TIMEOUT_S / 60)]
    ranks = forkserver.start_ranks("run_train", args, tmp_path / "rank")
    ranks[1].wait_for_line("rank 1 sleeping in step 3", timeout=120)
    t0 = time.monotonic()
    code = ranks[0].wait(timeout=120)
    waited = time.monotonic() - t0
    ranks[1].kill()
    ranks[1].wait()
    log = ranks[0].output()
    assert code == 2, log[-4000:]
    message = next(line for line in log.splitlines() if line.startswith("error: "))
    assert re.fullmatch(
        re.escape(f"error: rank 0: a collective operation waited trainer.timeout_minutes={TIMEOUT_S / 60:g} for "
                  "the other ranks at step 3 and timed out: another rank is hung, dead or far slower (Timed out "
                  f"waiting {TIMEOUT_S * 1000}ms for ") + "(send|recv)" + re.escape(" operation to complete). Run the "
                  "same command to resume from the last checkpoint."), message), message
    assert "Traceback" not in log
    assert waited < TIMEOUT_S + 20, waited  # the timeout and the teardown, not the 600 s sleep
    assert os.readlink(out / "checkpoints" / "last") == "step-00000002.ckpt"


@pytest.mark.subprocess
def test_slurm_requeue_after_a_fault_is_bounded(tmp_path, monkeypatch):
    bin_dir = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "run"
    for restart in range(2):  # the job's first run, then its requeued run: each fault requeues once
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        said = requeue_after_fault(out, 2, rank=0, step=7, message="rank 0: ...")
        assert said == f"Requeued SLURM job 4242 (fault restart {restart + 1} of trainer.max_restarts=2); it " \
                       "resumes from the last checkpoint."
        # Another rank seeing the same fault does not requeue a second time.
        again = requeue_after_fault(out, 2, rank=1, step=7, message="rank 1: ...")
        assert again.startswith("SLURM job 4242 is being requeued (by another rank)")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    said = requeue_after_fault(out, 2, rank=0, step=9, message="rank 0: ...")
    assert said.startswith("Not requeued: the 2 fault restart(s) of SLURM job 4242 reached trainer.max_restarts=2")
    assert (bin_dir / "calls.txt").read_text().splitlines() == ["requeue 4242", "requeue 4242"]
    records = sorted((out / "restarts").iterdir())
    assert [p.name for p in records] == ["4242-0.json", "4242-1.json"]
    assert json.loads(records[0].read_text())["step"] == 7


@pytest.mark.parametrize("value", ["0", "-1"])
def test_timeout_and_restarts_are_validated(value):
    from longcpt.config import load_config
    from longcpt.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, [f"trainer.timeout_minutes={value}", "trainer.max_restarts=-1"])
    assert f"trainer.timeout_minutes={float(value)}: must be > 0" in str(e.value)
    assert "trainer.max_restarts=-1: must be >= 0" in str(e.value)
