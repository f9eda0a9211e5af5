"""Exact resume: a run killed with SIGKILL and relaunched equals an uninterrupted run (CPU, fp32)."""

import os
import signal
import time

import pytest
import torch
from lit_helpers import read_metrics, run_synthetic, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = 8


def overrides(out, tokenizer_dir):
    # Gradient accumulation and a validation pass in between make the loop state non-trivial.
    return tiny_overrides(out, tokenizer_dir, trainer__max_steps=STEPS, optim__accumulate_grad_batches=2,
                          trainer__val_every_n_steps=3, trainer__keep_last_k=1)


def final_weights(out):
    return torch.load(out / "checkpoints" / "last", weights_only=False)["state_dict"]


def test_kill9_then_resume_equals_uninterrupted(tmp_path, tokenizer_dir):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    slow = {"SYNTHETIC_BATCH_SLEEP": "0.4"}  # so the kill lands mid-run, after a checkpoint
    killed = run_synthetic(overrides(run_dir, tokenizer_dir), env=slow, wait=False)
    reference = run_synthetic(overrides(ref_dir, tokenizer_dir))
    assert reference.returncode == 0, reference.stdout[-3000:]

    target = run_dir / "checkpoints" / "step-00000004.ckpt"
    deadline = time.time() + 240
    while not target.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it could be killed:\n" + killed.stdout.read()[-3000:]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    killed.stdout.close()
    last = os.readlink(run_dir / "checkpoints" / "last")
    assert last in {"step-00000004.ckpt", "step-00000006.ckpt"}, last

    resumed = run_synthetic(overrides(run_dir, tokenizer_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / last}" in resumed.stdout

    ref, got = read_metrics(ref_dir)["train/loss"], read_metrics(run_dir)["train/loss"]
    resumed_from = int(last[5:13])
    assert set(range(resumed_from, STEPS)) <= set(got)
    for step in range(resumed_from, STEPS):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    a, b = final_weights(ref_dir), final_weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
