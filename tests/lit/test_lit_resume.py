"""Exact resume on real prepared data: a run killed with SIGKILL while writing a checkpoint, then
relaunched with the same command, equals an uninterrupted run (CPU, fp32, seeded). The runs are
fork server children (tests/forkserver.py): real processes, without Python's start-up each."""

import os
import signal

import pytest
import torch
from lit_helpers import read_metrics, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = 8


def overrides(out, corpus):
    # Gradient accumulation and validation passes in between make the loop state non-trivial.
    return tiny_overrides(out, None, corpus, trainer__max_steps=STEPS, optim__accumulate_grad_batches=2,
                          trainer__val_every_n_steps=3, trainer__keep_last_k=1)


def final_weights(out):
    return torch.load(out / "checkpoints" / "last", weights_only=False)["state_dict"]


def test_kill9_during_a_save_then_resume_equals_uninterrupted(tmp_path, corpus, forkserver):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = forkserver.run("run_train", overrides(ref_dir, corpus), tmp_path / "reference.log", timeout=600)
    assert reference.returncode == 0, reference.output()[-3000:]

    # SIGKILL after step 6's checkpoint is written to its temporary name, before it replaces step 4.
    killed = forkserver.run("run_train", ["--die-in-save", "6", *overrides(run_dir, corpus)], tmp_path / "killed.log",
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.output()[-3000:]
    ckpts = run_dir / "checkpoints"
    assert os.readlink(ckpts / "last") == "step-00000004.ckpt" and (ckpts / "step-00000004.ckpt").is_file()
    assert (ckpts / ".step-00000006.ckpt.tmp").is_file() and not (ckpts / "step-00000006.ckpt").exists()

    resumed = forkserver.run("run_train", overrides(run_dir, corpus), tmp_path / "resumed.log", timeout=600)
    assert resumed.returncode == 0, resumed.output()[-3000:]
    assert f"resuming from {ckpts / 'step-00000004.ckpt'}" in resumed.output()
    assert not list(ckpts.glob(".*.tmp"))

    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    assert set(range(4, STEPS)) <= set(got["train/loss"])
    for step in range(4, STEPS):
        assert got["train/loss"][step] == ref["train/loss"][step], step
    assert got["val/loss"][5] == ref["val/loss"][5]
    a, b = final_weights(ref_dir), final_weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
