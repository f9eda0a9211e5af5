"""SLURM: SIGUSR1 (sent by `--signal=USR1@600`) -> checkpoint at the next step, requeue, clean stop."""

import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from lit_helpers import REPO, fake_scontrol, tiny_overrides, wait_for_early_start

from longcpt.lit.stopping import StopAtStepBoundary, request_requeue, slurm_job_id

pytestmark = pytest.mark.slow


def slurm_env(bin_dir):
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "longcpt-test", "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
    }


def test_sigusr1_checkpoints_and_requeues(tmp_path, tokenizer_dir, forkserver):
    bin_dir = fake_scontrol(tmp_path / "bin")
    out = tmp_path / "run"
    args = ["--synthetic", *tiny_overrides(out, tokenizer_dir, trainer__max_steps=10, trainer__save_every_n_steps=1000)]
    child = forkserver.start("run_train", args, tmp_path / "first.log",
                             env={**slurm_env(bin_dir), "SYNTHETIC_BATCH_SLEEP": "0.2"})
    child.wait_for_line("step 2/10", timeout=300)
    child.kill(signal.SIGUSR1)
    code = child.wait(timeout=120)
    log = child.output()
    assert code == 0, log[-3000:]
    assert "requeued=True" in log

    calls = (bin_dir / "calls.txt").read_text().split("\n")
    assert calls[0] == "requeue 4242"
    last = os.readlink(out / "checkpoints" / "last")
    step = int(re.fullmatch(r"step-(\d+)\.ckpt", last).group(1))
    assert 2 <= step < 10, "a checkpoint at the step after the signal, before the end"
    assert not (out / "hf").exists()

    # What the requeued job does: the same command resumes from that checkpoint and finishes.
    again = forkserver.run("run_train", args, tmp_path / "again.log", env=slurm_env(bin_dir))
    assert again.returncode == 0, again.output()[-3000:]
    assert f"resuming from {out / 'checkpoints' / last}" in again.output()
    assert "step=10 requeued=False" in again.output()


def test_sigusr1_during_start_up_checkpoints_after_the_first_step_and_requeues(tmp_path, corpus):
    """A SIGUSR1 that comes while `longcpt train` is still importing (a job whose --time is not longer
    than its --signal lead, a slow model load) used to end the process: the loop's handler did not
    exist yet, so under srun every rank died with no checkpoint and no requeue."""
    bin_dir = fake_scontrol(tmp_path / "bin")
    out = tmp_path / "run"
    args = tiny_overrides(out, None, corpus, trainer__max_steps=6, trainer__save_every_n_steps=1000)
    env = {**os.environ, **slurm_env(bin_dir), "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longcpt", "train", str(REPO / "recipes" / "tiny_cpu.yaml"), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    early = wait_for_early_start([proc.pid])
    proc.send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, f"exit status {proc.returncode}: {log[-3000:]}"
    assert early, "no SIGUSR1 handler before torch was imported"
    assert re.search(r"SIGUSR1 received during start-up \(\d+\.\d s after `longcpt train` began\), before training", log), log[-3000:]
    assert "stopped for requeue at step 1" in log
    assert (bin_dir / "calls.txt").read_text() == "requeue 4242\n"
    assert os.readlink(out / "checkpoints" / "last") == "step-00000001.ckpt"


def test_sigusr1_outside_slurm_keeps_its_default_action(tmp_path, corpus):
    """Only a SLURM job records SIGUSR1: elsewhere nothing would act on it, so it ends the process as before."""
    args = tiny_overrides(tmp_path / "run", None, corpus, trainer__max_steps=6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen([sys.executable, "-m", "longcpt", "train", str(REPO / "recipes" / "tiny_cpu.yaml"), *args],
                            env={**env, "PYTHONPATH": str(REPO / "src")}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert not wait_for_early_start([proc.pid], timeout=1.0)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGUSR1


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
