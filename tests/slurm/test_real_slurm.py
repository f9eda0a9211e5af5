"""slurm/*.sbatch under a real SLURM: `make test-slurm` starts a one-node cluster with a CPU partition
(tests/slurm/cluster.sh), and these tests submit the repository's scripts to it as a user would.

- a 2-rank DDP job of the tiny recipe (the reference run);
- `scancel --signal=USR1` mid-run: checkpoint, `scontrol requeue`, the requeued job released at once
  (`scontrol update JobId=... StartTime=now`: SLURM holds a requeued job for about two minutes
  otherwise), resumed to the end with the reference's weights, bit for bit;
- a SIGUSR1 to the batch shell only (`scancel --batch`) while the ranks are still starting (before
  torch is even imported): it used to kill bash, and a rank that got it that early: requeued after
  the first step, then the same weights;
- `convert.sbatch` on the requeued run's result, loaded by transformers with the same weights.

Each test prints its timeline (seconds since submission, wall clock, event); run with `-rP` to see it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lit_helpers import REPO, make_corpus, tiny_overrides, wait_for_early_start

from longcpt.export.convert import read_checkpoint

pytestmark = pytest.mark.slurm

STEPS = 60
# The CPU-partition flags of docs/training.md: two ranks on one node, no GPU request, a short lead.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00",
           "--signal=USR1@60"]
WATCHED = re.compile(r"^(job \d+ restart|.*SIGUSR1|.*requeued SLURM job|resuming from|batch shell:|"
                     r"longcpt train: |.*checkpointing step)")


def slurm(*args: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
    return result.stdout


class Job:
    """A submitted job: its log, its state, and a timeline of what happened when."""

    def __init__(self, work: Path, script: str, sbatch_args: list[str], args: list[str], name: str):
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LONGCPT_VENV": sys.prefix, "OMP_NUM_THREADS": "1"}
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str, str]] = []
        out = subprocess.run(["sbatch", "--parsable", f"--chdir={work}", *sbatch_args, str(REPO / "slurm" / script),
                              *args], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        self.id = out.stdout.strip().split(";")[0]
        self.name, self.log = name, work / "logs" / f"longcpt-{script.removesuffix('.sbatch')}-{self.id}.out"
        self._state, self._lines = "", 0
        self.note(f"submitted job {self.id}")

    def note(self, what: str) -> None:
        self.events.append((time.monotonic() - self.t0, time.strftime("%H:%M:%S"), what))

    def info(self) -> dict[str, str]:
        text = slurm("scontrol", "show", "job", "-o", self.id)
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def poll(self) -> dict[str, str]:
        """Note state changes and new watched log lines; return the job's fields."""
        info = self.info()
        state = f"{info['JobState']} (Reason={info.get('Reason')}, Restarts={info.get('Restarts')})"
        if state != self._state:
            self._state = state
            self.note(f"state {state}")
        lines = self.text().splitlines()
        for line in lines[self._lines:]:
            if WATCHED.match(line):
                self.note(f"log: {line.strip()[:150]}")
        self._lines = len(lines)
        return info

    def wait(self, condition, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while True:
            info = self.poll()
            if found := condition(info):
                return found
            assert info["JobState"] not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), \
                f"job {self.id} {info['JobState']} while waiting for {what}:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"job {self.id}: no {what} after {timeout} s:\n{self.text()[-4000:]}"
            time.sleep(0.1)

    def wait_log(self, pattern: str, timeout: float = 120) -> re.Match:
        return self.wait(lambda info: re.search(pattern, self.text(), re.M), f"log line /{pattern}/", timeout)

    def finish(self, timeout: float = 180) -> dict[str, str]:
        info = self.wait(lambda info: info if info["JobState"] == "COMPLETED" else None, "COMPLETED", timeout)
        self.report()
        return info

    def release_requeued(self, timeout: float = 120) -> None:
        """Wait for the requeued job to be pending again, then let it start now."""
        self.wait(lambda i: i["JobState"] == "PENDING" and int(i["Restarts"]) >= 1, "requeued and PENDING", timeout)
        slurm("scontrol", "update", f"JobId={self.id}", "StartTime=now")
        self.note(f"scontrol update JobId={self.id} StartTime=now")

    def report(self) -> None:
        print(f"\ntimeline of {self.name} (job {self.id}):")
        for t, wall, what in self.events:
            print(f"  {t:7.1f} s  {wall}  {what}")


def train_args(out: Path, corpus: dict) -> list[str]:
    # The script sets trainer.devices and trainer.num_nodes from the job (and refuses them here).
    overrides = tiny_overrides(out, None, corpus, trainer__max_steps=STEPS, trainer__save_every_n_steps=1000,
                               trainer__log_every_n_steps=5, data__seq_len=128, data__micro_batch_size=4,
                               strategy__name="ddp", optim__min_lr_ratio=1.0)
    return [str(REPO / "recipes" / "tiny_cpu.yaml"), *(o for o in overrides if not o.startswith("trainer.devices="))]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm")
    (folder / "logs").mkdir()  # what a clone of the repository has; SLURM opens the log before the script runs
    return folder


@pytest.fixture(scope="module")
def corpus(work) -> dict[str, Path]:
    return make_corpus(work / "corpus")


@pytest.fixture(scope="module")
def reference(work, corpus) -> Job:
    """An uninterrupted 2-rank DDP run."""
    job = Job(work, "train.sbatch", CPU_JOB, train_args(work / "reference", corpus), "the uninterrupted run")
    job.finish()
    return job


@pytest.fixture(scope="module")
def mid_run(work, corpus, reference) -> Job:
    """`scancel --signal=USR1` at step 10, the requeued job released at once, resumed to the end."""
    job = Job(work, "train.sbatch", CPU_JOB, train_args(work / "mid_run", corpus), "USR1 mid-run")
    job.wait_log(rf"^step 10/{STEPS}")
    slurm("scancel", "--signal=USR1", job.id)
    job.note(f"scancel --signal=USR1 {job.id}")
    job.release_requeued()
    job.finish()
    return job


def assert_same_weights(run: Path, reference: Path) -> None:
    got, _ = read_checkpoint(run)
    ref, _ = read_checkpoint(reference)
    assert got.keys() == ref.keys()
    differ = {k: float((got[k] - ref[k]).abs().max()) for k in ref if not torch.equal(got[k], ref[k])}
    assert not differ, f"weights differ from the uninterrupted run's (max abs difference): {differ}"
    print(f"final weights of {run.name}: {len(ref)} tensors, bit-identical to the uninterrupted run's")


def last_step(run: Path) -> int:
    return int(re.fullmatch(r"step-(\d+)\.ckpt", os.readlink(run / "checkpoints" / "last")).group(1))


def test_two_rank_ddp_job_of_the_tiny_recipe(reference, work):
    log = reference.text()
    assert "1 node(s) x 2 task(s)" in log and "MEMBER: 2/2" in log, log[-3000:]
    assert f"longcpt train: finished at step {STEPS}" in log
    config = (work / "reference" / "config.yaml").read_text()
    assert re.search(r"^  devices: 2$", config, re.M) and re.search(r"^  num_nodes: 1$", config, re.M)
    assert last_step(work / "reference") == STEPS


def test_usr1_mid_run_requeues_and_resumes_to_the_same_weights(mid_run, work):
    log = mid_run.text()
    step = int(re.search(r"SIGUSR1 received: checkpointing step (\d+) and stopping", log).group(1))
    assert 10 <= step < STEPS
    assert f"requeued SLURM job {mid_run.id}" in log and "restart 1" in log
    assert f"resuming from {work / 'mid_run' / 'checkpoints' / f'step-{step:08d}.ckpt'}" in log
    assert mid_run.info()["Restarts"] == "1" and last_step(work / "mid_run") == STEPS
    assert_same_weights(work / "mid_run", work / "reference")


def test_convert_sbatch_export_loads_in_transformers(mid_run, work):
    from transformers import AutoModelForCausalLM

    hf = work / "mid_run" / "hf-slurm"
    job = Job(work, "convert.sbatch", ["--cpus-per-task=1", "--time=00:05:00"], [str(work / "mid_run"), str(hf)],
              "convert.sbatch")
    job.finish(timeout=120)
    model = AutoModelForCausalLM.from_pretrained(hf)
    ref, _ = read_checkpoint(work / "mid_run")
    weights = model.state_dict()
    assert all(torch.equal(weights[k], ref[k]) for k in ref), "the export's weights are not the checkpoint's"
    ids = torch.randint(3, 200, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def rank_pids(job: Job) -> list[int]:
    """PIDs of the job's training tasks (step 0) on this node, once they exist (`scontrol listpids`)."""
    listed = subprocess.run(["scontrol", "listpids", job.id], capture_output=True, text=True, timeout=60)
    rows = [line.split() for line in listed.stdout.splitlines()[1:]] if listed.returncode == 0 else []
    return [int(row[0]) for row in rows if row[2] == "0" and row[3] != "-"]


def test_usr1_to_the_batch_shell_during_start_up_requeues_after_the_first_step(work, corpus, reference):
    """`scancel --batch --signal=USR1` while both ranks are still importing (before torch): two
    failures at once. Bash died of a SIGUSR1 (`died by signal: 10`: the job failed, no requeue); now
    the script passes it to srun, which forwards it to the ranks. And a rank that got SIGUSR1 before
    the training loop's handler existed died of it (a job whose --time is not longer than its lead
    gets it there; so can a slow model load): `srun: error: ... tasks 0-1: User defined signal 1`.
    Now it is recorded from the first line and acted on at the first step boundary."""
    job = Job(work, "train.sbatch", CPU_JOB, train_args(work / "early", corpus), "USR1 to the batch shell at start-up")
    pids = job.wait(lambda info: len(p := rank_pids(job)) == 2 and p, "two training tasks", 120)
    early = wait_for_early_start(pids)
    slurm("scancel", "--batch", "--signal=USR1", job.id)
    job.note(f"scancel --batch --signal=USR1 {job.id} (each rank caught SIGUSR1 before loading torch: {early})")
    job.release_requeued()
    job.finish()
    log = job.text()
    assert "batch shell: SIGUSR1 passed on to the training tasks" in log, log[-3000:]
    assert re.search(r"SIGUSR1 received during start-up \(\d+\.\d s after `longcpt train` began\), before training", log), log[-3000:]
    assert "SIGUSR1 received: checkpointing step 1 and stopping" in log and f"requeued SLURM job {job.id}" in log
    assert early, "the ranks had no SIGUSR1 handler before importing torch"
    assert_same_weights(work / "early", work / "reference")
