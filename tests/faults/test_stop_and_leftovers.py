"""SIGTERM stops a run at the next step boundary with a checkpoint and exit status 0; temporaries a
killed run left behind are removed at the next start with a line saying so."""

import os
import shutil
import signal

import pytest
from fault_helpers import STEPS, assert_same_weights, run, weights
from lit_helpers import tiny_overrides


@pytest.mark.subprocess
def test_sigterm_checkpoints_at_the_next_step_then_exits_0(forkserver, tmp_path, tokenizer_dir, uninterrupted):
    out = tmp_path / "run"
    args = ["--synthetic", *tiny_overrides(out, tokenizer_dir, trainer__max_steps=STEPS,
                                           trainer__save_every_n_steps=1000)]
    child = forkserver.start("run_train", args, tmp_path / "stopped.log", env={"SYNTHETIC_BATCH_SLEEP": "0.3"})
    child.wait_for_line("step 1/")
    child.kill(signal.SIGTERM)
    log = child.output() if child.wait() is not None else ""
    assert child.returncode == 0, log[-3000:]
    assert "SIGTERM received: checkpointing step" in log and "stopped_by=SIGTERM" in log and "requeued=False" in log
    last = os.readlink(out / "checkpoints" / "last")
    assert last in ("step-00000002.ckpt", "step-00000003.ckpt"), last  # the boundary after the signal

    again = forkserver.run("run_train", args, tmp_path / "resumed.log")
    assert again.returncode == 0, again.output()[-3000:]
    assert f"resuming from {out / 'checkpoints' / last}" in again.output()
    assert f"RESULT step={STEPS} " in again.output()
    assert_same_weights(weights(out / "checkpoints" / "last"), uninterrupted)


def test_leftovers_of_a_killed_run_are_removed_at_start(tmp_path, tokenizer_dir, capsys, uninterrupted):
    out = tmp_path / "run"
    run(out, tokenizer_dir, trainer__max_steps=STEPS, trainer__keep_last_k=3)
    ckpts = out / "checkpoints"
    for name in ("step-00000006.ckpt", "step-00000006.ckpt.manifest.json", "last"):  # as if killed after 4
        (ckpts / name).unlink()
    os.symlink("step-00000004.ckpt", ckpts / "last")
    leftovers = {
        ckpts / ".step-00000006.ckpt.tmp": b"x" * 2048,                     # a Lightning file being written
        ckpts / ".step-00000008.ckpt.tmp" / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"x",
        ckpts / "step-00000006.ckpt.manifest.json": b"{}",                  # killed before the rename
        ckpts / ".step-00000004.ckpt.manifest.json.tmp-k3j2.json": b"{",    # a manifest being written
        ckpts / ".step-00000002.ckpt.tmp-pruned": b"x",                     # a pruned checkpoint being deleted
        out / ".config.yaml.tmp-a1b2.yaml": b"trainer:",                    # longcpt.fsio temporaries
        out / ".tokenizer.tmp-c3d4" / "tokenizer.json": b"{}",
    }
    for path, data in leftovers.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.symlink("step-00000004.ckpt", ckpts / ".last.tmp")
    shutil.copy(ckpts / "step-00000002.ckpt", ckpts / "step-00000001.ckpt.corrupt")  # never touched
    capsys.readouterr()

    result = run(out, tokenizer_dir, trainer__max_steps=STEPS)
    log = capsys.readouterr().out
    assert result.global_step == STEPS
    assert f"removed 6 temporary file(s) left in {ckpts} by an interrupted run: " in log
    assert ".step-00000006.ckpt.tmp (2.0 KiB)" in log and ".last.tmp (a link)" in log
    assert "step-00000006.ckpt.manifest.json (its checkpoint was never renamed into place)" in log
    assert f"removed 2 temporary file(s) left in {out} by an interrupted run: " in log
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert (ckpts / "step-00000001.ckpt.corrupt").is_file()
    assert f"resuming from {ckpts / 'step-00000004.ckpt'}" in log
    assert_same_weights(weights(ckpts / "last"), uninterrupted)
