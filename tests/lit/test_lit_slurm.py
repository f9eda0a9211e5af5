"""SLURM: SIGUSR1 (sent by `--signal=USR1@600`) -> checkpoint at the next step, requeue, clean stop."""

import os
import re
import signal
from types import SimpleNamespace

import pytest
from lit_helpers import fake_scontrol, run_train, tiny_overrides

from longcpt.lit.callbacks import StopAtStepBoundary, request_requeue, slurm_job_id

pytestmark = pytest.mark.slow


def slurm_env(bin_dir):
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "longcpt-test", "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
    }


def test_sigusr1_checkpoints_and_requeues(tmp_path, tokenizer_dir):
    bin_dir = fake_scontrol(tmp_path / "bin")
    out = tmp_path / "run"
    args = tiny_overrides(out, tokenizer_dir, trainer__max_steps=30, trainer__save_every_n_steps=1000)
    proc = run_train(args, "--synthetic", env={**slurm_env(bin_dir), "SYNTHETIC_BATCH_SLEEP": "0.2"}, wait=False)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/30"):
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    assert "requeued=True" in log

    calls = (bin_dir / "calls.txt").read_text().split("\n")
    assert calls[0] == "requeue 4242"
    last = os.readlink(out / "checkpoints" / "last")
    step = int(re.fullmatch(r"step-(\d+)\.ckpt", last).group(1))
    assert 2 <= step < 30, "a checkpoint at the step after the signal, long before the end"
    assert not (out / "hf").exists()

    # What the requeued job does: the same command resumes from that checkpoint and finishes.
    again = run_train(args, "--synthetic", env=slurm_env(bin_dir))
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resuming from {out / 'checkpoints' / last}" in again.stdout and "step=30 requeued=False" in again.stdout


def test_job_id_of_array_jobs(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    assert slurm_job_id() == "100"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "99_3"


def test_requeue_without_scontrol_is_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert request_requeue() is False


@pytest.mark.parametrize("exit_status, requeued", [(0, True), (1, False)])
def test_a_failed_requeue_is_not_reported_as_one(tmp_path, monkeypatch, exit_status, requeued):
    """The checkpoint is saved and training stops either way; only a successful `scontrol requeue`
    counts as requeued (a failed one used to be reported as success, and nothing resumed the run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho 'slurm_requeue error: Access/permission denied' >&2\n"
                                      f"exit {exit_status}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    saved = []
    checkpoints = SimpleNamespace(just_stepped=True, saved_step=None, save=lambda t: saved.append(t.global_step))
    strategy = SimpleNamespace(reduce=lambda tensor, reduce_op="sum": tensor, broadcast=lambda obj, src=0: obj)
    trainer = SimpleNamespace(strategy=strategy, is_global_zero=True, global_step=7, should_stop=False,
                              datamodule=None)
    callback = StopAtStepBoundary(checkpoints, requeue_signal=signal.SIGUSR1)
    callback.flags[1] = True  # the requeue signal arrived
    callback.on_train_batch_end(trainer, SimpleNamespace(device="cpu"), None, None, 0)
    assert saved == [7] and trainer.should_stop and callback.stopped_by == "SIGUSR1"
    assert callback.requeued is requeued and callback.requeue_failed is not requeued
