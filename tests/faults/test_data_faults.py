"""Data that disappears or is damaged: one clear message naming the folder or shard; a run whose data
vanished mid-run checkpoints first and resumes exactly once the folder is back."""

import os
import shutil

import pytest
from fault_helpers import STEPS, assert_same_weights, weights
from lightning.pytorch.callbacks import Callback
from lit_helpers import tiny_overrides

from longcpt.config import load_config
from longcpt.errors import LongcptError
from longcpt.lit.train import train


def overrides(out, tokenizer, data, **extra):
    corpus = {"tokenizer": tokenizer, "train": data / "train", "val": data / "val"}
    return tiny_overrides(out, None, corpus, data__seq_len=32, trainer__max_steps=STEPS,
                          trainer__val_every_n_steps=3, **extra)


def run_real(out, tokenizer, data, callbacks=None, **extra):
    """`longcpt train` in process on a prepared data set (the real PretrainDataModule)."""
    return train(load_config(None, overrides(out, tokenizer, data, **extra)), callbacks=callbacks)


@pytest.fixture
def data(tmp_path, data_dir):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


class Vanish(Callback):
    """Move the training data away after optimizer step `step` (a purge, a colleague's `rm -r`)."""

    def __init__(self, folder, step):
        self.folder, self.step = folder, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.folder.exists():
            os.replace(self.folder, self.folder.with_name("moved-away"))


def test_data_vanishing_mid_run_stops_with_a_checkpoint(tmp_path, tokenizer_dir, data):
    reference = tmp_path / "reference"
    run_real(reference, tokenizer_dir, data)

    out = tmp_path / "run"
    with pytest.raises(LongcptError) as e:
        run_real(out, tokenizer_dir, data, callbacks=[Vanish(data / "train", 3)])
    assert str(e.value) == (
        f"data.train={str(data / 'train')!r} vanished during the run (noticed after step 4); checkpoint step 4 "
        "was saved first, so nothing is lost. Restore the folder and run the same command to resume from it.")
    assert os.readlink(out / "checkpoints" / "last") == "step-00000004.ckpt"

    os.replace(data / "moved-away", data / "train")
    result = run_real(out, tokenizer_dir, data)
    assert result.global_step == STEPS
    assert_same_weights(weights(out / "checkpoints" / "last"), weights(reference / "checkpoints" / "last"))


@pytest.mark.subprocess
def test_cli_names_the_damaged_arrow_shard(forkserver, tmp_path, tokenizer_dir, data):
    shard = data / "train" / "data-00000-of-00001.arrow"
    os.truncate(shard, shard.stat().st_size // 2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("trainer:\n  max_steps: 4\n")
    r = forkserver.run("cli", ["train", recipe, *overrides(tmp_path / "run", tokenizer_dir, data)],
                       tmp_path / "cli.log")
    log = r.output()
    assert r.returncode == 2 and "Traceback" not in log, log[-3000:]
    assert (f"longcpt train: error: {str(data / 'train')!r} is not a readable data set: its shard "
            "data-00000-of-00001.arrow is damaged (Expected to be able to read ") in log, log[-2000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_token_ids_beyond_the_vocabulary_name_the_data_set(tmp_path, tokenizer_dir):
    from datasets import Dataset

    bad = tmp_path / "bad"
    Dataset.from_dict({"input_ids": [[5, 6, 7] * 20, [9, 400, 11] * 20]}).save_to_disk(str(bad / "train"))
    with pytest.raises(LongcptError, match=rf"data.train='{bad / 'train'}': a window holds token id 400 but the "
                                           "tokenizer has 96 tokens"):
        run_real(tmp_path / "run", tokenizer_dir, bad, data__val="null")
