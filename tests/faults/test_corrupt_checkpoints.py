"""Damaged checkpoints: resume skips them (renamed `*.corrupt`, never deleted) and continues from the
newest one that verifies, with final weights equal to an uninterrupted run's; with none left, one
error names every file tried."""

import os
import shutil

import pytest
from fault_helpers import (
    STEPS,
    assert_same_weights,
    delete,
    garble_manifest,
    run,
    truncate,
    weights,
    zero_block,
)

from longcpt.errors import LongcptError
from longcpt.manifest import manifest_path, verify


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir, uninterrupted):
    """The uninterrupted run's weights, and a run stopped after 4 steps (checkpoints at 2 and 4)."""
    stopped = tmp_path_factory.mktemp("corrupt") / "stopped"
    run(stopped, tokenizer_dir, trainer__max_steps=4)
    return {"final": uninterrupted, "stopped": stopped}


def damaged_copy(reference, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(reference["stopped"], out, symlinks=True)
    ckpts = out / "checkpoints"
    assert os.readlink(ckpts / "last") == "step-00000004.ckpt"
    damage(ckpts / "step-00000004.ckpt")
    return out, ckpts


@pytest.mark.parametrize("damage, problem", [
    (truncate, "bytes, its manifest says"),
    (zero_block, "differs from its manifest's SHA-256"),
    (delete, "step-00000004.ckpt is missing"),
    (garble_manifest, "step-00000004.ckpt.manifest.json is unreadable"),
], ids=["truncated", "zeroed", "deleted", "bad-manifest"])
def test_resume_skips_a_damaged_last_checkpoint(reference, tmp_path, tokenizer_dir, capsys, damage, problem):
    out, ckpts = damaged_copy(reference, tmp_path, damage)
    capsys.readouterr()
    result = run(out, tokenizer_dir, trainer__max_steps=STEPS)
    log = capsys.readouterr().out
    assert result.global_step == STEPS
    assert f"skipping checkpoint {ckpts / 'step-00000004.ckpt'}: " in log and problem in log
    assert "Renamed to step-00000004.ckpt.corrupt" in log
    assert f"resuming from {ckpts / 'step-00000002.ckpt'}" in log
    # Kept for inspection, with its manifest; the new step 4 was written again from step 2.
    kept = [p.name for p in ckpts.iterdir() if ".corrupt" in p.name]
    assert "step-00000004.ckpt.corrupt.manifest.json" in kept
    assert (damage is delete) != ("step-00000004.ckpt.corrupt" in kept)
    assert_same_weights(weights(ckpts / "last"), reference["final"])
    assert verify(ckpts / "step-00000006.ckpt") == []


def test_legacy_checkpoint_without_manifest_gets_a_load_check(reference, tmp_path, tokenizer_dir, capsys):
    """Checkpoints written before manifests: a whole one resumes, a truncated one is skipped."""
    out, ckpts = damaged_copy(reference, tmp_path, truncate)
    for step in (2, 4):
        manifest_path(ckpts / f"step-0000000{step}.ckpt").unlink()
    assert verify(ckpts / "step-00000002.ckpt") == []
    result = run(out, tokenizer_dir, trainer__max_steps=STEPS)
    log = capsys.readouterr().out
    assert result.global_step == STEPS
    assert "step-00000004.ckpt is not a complete torch checkpoint" in log
    assert f"resuming from {ckpts / 'step-00000002.ckpt'}" in log
    assert_same_weights(weights(ckpts / "last"), reference["final"])


def test_nothing_verifies_one_error_naming_every_file(reference, tmp_path, tokenizer_dir):
    out, ckpts = damaged_copy(reference, tmp_path, zero_block)
    truncate(ckpts / "step-00000002.ckpt")
    with pytest.raises(LongcptError) as e:
        run(out, tokenizer_dir, trainer__max_steps=STEPS)
    msg = str(e.value)
    assert msg.startswith(f"no checkpoint in {ckpts} can be resumed from:")
    assert "step-00000004.ckpt: step-00000004.ckpt: the content differs" in msg
    assert "step-00000002.ckpt: step-00000002.ckpt has" in msg and "trainer.resume=false" in msg
    assert sorted(p.name for p in ckpts.glob("*.corrupt")) == ["step-00000002.ckpt.corrupt",
                                                                "step-00000004.ckpt.corrupt"]
    # The same command again does not silently start over from step 0.
    with pytest.raises(LongcptError, match="set aside earlier after failing verification: "
                                           "step-00000002.ckpt.corrupt, step-00000004.ckpt.corrupt"):
        run(out, tokenizer_dir, trainer__max_steps=STEPS)
    # Starting over moves them aside; nothing is deleted.
    result = run(out, tokenizer_dir, trainer__max_steps=2, trainer__resume="false")
    assert result.global_step == 2
    aside = next(out.glob("checkpoints.replaced-*"))
    assert (aside / "step-00000004.ckpt.corrupt").is_file()


def test_export_refuses_a_damaged_checkpoint(reference, tmp_path):
    from longcpt.export.convert import export_checkpoint

    _, ckpts = damaged_copy(reference, tmp_path, zero_block)
    with pytest.raises(LongcptError, match=r"step-00000004\.ckpt is damaged: step-00000004\.ckpt: the content "
                                           r"differs from its manifest's SHA-256 .* Use an earlier checkpoint"):
        export_checkpoint(ckpts / "last", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_checkpoint(ckpts / "step-00000002.ckpt", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
