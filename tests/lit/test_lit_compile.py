"""`trainer.compile` through `longcpt train` (in process, one CPU device, synthetic windows)."""

import os

import pytest
import torch
from lit_helpers import SyntheticDataModule, tiny_overrides

from longcpt.config import load_config
from longcpt.errors import ConfigError
from longcpt.lit.train import train
from longcpt.model.compile import use_cache_dir


def run(out, tokenizer_dir, **extra):
    cfg = load_config(None, tiny_overrides(out, tokenizer_dir, attention__kind="anchor", trainer__max_steps=3,
                                           **extra))
    train(cfg, datamodule=SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size))
    return torch.load(out / "checkpoints" / "last", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_compiled_blocks_train_to_the_eager_weights(tmp_path, tokenizer_dir, inductor_cache, capsys):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = run(tmp_path / "eager", tokenizer_dir)
    compiled = run(tmp_path / "blocks", tokenizer_dir, trainer__compile="blocks")
    assert eager.keys() == compiled.keys()  # compiled in place: the checkpoint keys are the model's
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-5, msg=k)
    out = capsys.readouterr().out
    assert "trainer.compile=blocks: first step" in out and "torch.compile: 1 graph(s), 0 graph break(s)" in out


def test_cache_folder_is_the_run_folders_unless_set(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_cache_dir(tmp_path / "run" / "inductor") == tmp_path / "run" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "run" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_cache_dir(tmp_path / "other") == tmp_path / "mine"


def test_unknown_compile_mode_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.compile='block': must be one of none, blocks, model; did you mean blocks"):
        load_config(None, [f"trainer.out_dir={tmp_path}", "trainer.compile=block", "model.config={hidden_size: 8}",
                           "model.tokenizer=x"])
