"""`train` in process on synthetic data: run folder, checkpoints, logged metrics, resume switch."""

import dataclasses
import os

import pytest
import torch
import yaml
from lit_helpers import SyntheticDataModule, read_metrics, tiny_overrides

from longcpt.config import load_config
from longcpt.errors import LongcptError
from longcpt.lit.optim import lr_factor
from longcpt.lit.train import train


def run(tmp_path, tokenizer_dir, **extra):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", tokenizer_dir, **extra))
    return train(cfg, datamodule=SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size)), cfg


def test_run_folder_checkpoints_and_metrics(tmp_path, tokenizer_dir):
    result, cfg = run(tmp_path, tokenizer_dir, trainer__max_steps=7, trainer__keep_last_k=2,
                      optim__accumulate_grad_batches=2, trainer__val_every_n_steps=3)
    out = tmp_path / "run"
    assert result.global_step == 7 and not result.requeued and result.hf_dir is None
    # Saved at 2, 4, 6 and at the end (7); the newest two are kept, each with its manifest, and
    # `last` is the final one.
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last", "step-00000006.ckpt", "step-00000006.ckpt.manifest.json",
        "step-00000007.ckpt", "step-00000007.ckpt.manifest.json"]
    assert os.readlink(ckpts / "last") == "step-00000007.ckpt"
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_steps"] == 7
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    ckpt = torch.load(ckpts / "last", weights_only=False)
    assert ckpt["global_step"] == 7 and ckpt["longcpt"]["model_args"]["hidden_size"] == 64

    m = read_metrics(out)
    assert sorted(m["train/loss"]) == list(range(7))
    for step, lr in m["train/lr"].items():  # the rate each step trained with
        assert lr == pytest.approx(cfg.optim.lr * lr_factor(step, 2, 7, cfg.optim.min_lr_ratio), rel=1e-6)
    assert all(v > 0 for v in m["train/grad_norm"].values())
    assert all(0 < v < 1 for v in m["train/padding"].values())
    assert all(v > 0 for v in m["train/tokens_per_s"].values())
    # 2 micro-batches of 2 windows of 32 tokens per step.
    assert m["train/tokens"][6] == 7 * 2 * 2 * 32
    assert set(m["val/loss"]) == {2, 5}  # after steps 3 and 6


def test_infini_run_logs_the_memory_gates(tmp_path, tokenizer_dir, capsys):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", tokenizer_dir, attention__kind="infini",
                                           attention__segment_len=8, attention__gate_lr=0.5, trainer__max_steps=4))
    train(cfg, datamodule=SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size, restart=True))
    m = read_metrics(tmp_path / "run")
    assert sorted(m["train/gate/mean"]) == list(range(4))
    # Logged after each optimizer step: the last row is the saved gates (2 layers x 4 heads).
    state = torch.load(tmp_path / "run" / "checkpoints" / "last", weights_only=False)["state_dict"]
    gates = torch.sigmoid(torch.stack([v for k, v in state.items() if k.endswith("core.gate")]).float())
    assert gates.numel() == 8
    for stat, value in (("mean", gates.mean()), ("min", gates.min()), ("max", gates.max()), ("std", gates.std())):
        assert m[f"train/gate/{stat}"][3] == pytest.approx(float(value), rel=1e-5)
    assert len(set(m["train/gate/mean"].values())) > 1  # the gates moved during the run
    last_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 4/4")][0]
    assert f"gate {float(gates.mean()):.3f} [{float(gates.min()):.3f}, {float(gates.max()):.3f}]" in last_line


def test_resume_false_starts_over_and_keeps_old_checkpoints(tmp_path, tokenizer_dir):
    run(tmp_path, tokenizer_dir, trainer__max_steps=2)
    result, _ = run(tmp_path, tokenizer_dir, trainer__max_steps=4)  # resumes: 2 more steps
    assert result.global_step == 4
    assert len(list((tmp_path / "run" / "logs" / "csv").iterdir())) == 2
    result, _ = run(tmp_path, tokenizer_dir, trainer__max_steps=2, trainer__resume="false")
    assert result.global_step == 2
    aside = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(aside) == 1 and (aside[0] / "step-00000004.ckpt").is_file()
    assert os.readlink(tmp_path / "run" / "checkpoints" / "last") == "step-00000002.ckpt"


def test_inference_only_attention_kind_is_refused_before_training(tmp_path, tokenizer_dir, monkeypatch):
    from longcpt.model.attention import KINDS

    # As an inference-time memory would be: a kind that `longcpt train` must refuse.
    monkeypatch.setitem(KINDS, "full", dataclasses.replace(KINDS["full"], trainable=False))
    with pytest.raises(LongcptError, match="attention.kind='full': an inference-time memory, not trainable"):
        run(tmp_path, tokenizer_dir)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was built


def test_tokenizer_larger_than_vocab_is_rejected(tmp_path, tokenizer_dir):
    overrides = tiny_overrides(tmp_path / "run", tokenizer_dir)
    overrides = [o.replace("max_position_embeddings: 256", "max_position_embeddings: 256, vocab_size: 50")
                 for o in overrides]
    with pytest.raises(LongcptError, match="tokenizer has 96 tokens but the model's vocab_size is 50"):
        load_config(None, overrides)  # found by validation, before anything is built


def cli(*args, timeout=600):
    import subprocess
    import sys

    from lit_helpers import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "longcpt", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_cli_trains_the_tiny_cpu_recipe_on_real_data(tmp_path, corpus, forkserver):
    from lit_helpers import REPO

    kind = "anchor"
    out = tmp_path / "run"
    result = forkserver.run(
        "cli", ["train", str(REPO / "recipes/tiny_cpu.yaml"), f"model.tokenizer={corpus['tokenizer']}",
                f"data.train={corpus['train']}", f"data.val={corpus['val']}", f"trainer.out_dir={out}",
                f"attention.kind={kind}", "data.seq_len=128", "data.micro_batch_size=2", "data.num_workers=0",
                "trainer.max_steps=3", "trainer.val_every_n_steps=2", "trainer.log_every_n_steps=1",
                "trainer.export_hf=true"], tmp_path / "train.log", timeout=600)
    output = result.output()
    assert result.returncode == 0, output[-3000:]
    assert "finished at step 3" in output and f"Hugging Face export: {out / 'hf'}" in output
    m = read_metrics(out)
    assert sorted(m["train/loss"]) == [0, 1, 2] and set(m["val/loss"]) == {1}
    assert yaml.safe_load((out / "config.yaml").read_text())["attention"]["kind"] == kind


@pytest.mark.subprocess
def test_cli_reports_every_bad_override_at_once(tmp_path):
    result = cli("train", "recipes/tiny_cpu.yaml", "trainer.max_step=3", "optim.lr=-1",
                 f"trainer.out_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "did you mean trainer.max_steps?" in result.stderr and "optim.lr=-1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_takes_the_newest_whole_checkpoint(tmp_path, tokenizer_dir):
    """A crash after a checkpoint is renamed into place but before `last` moves to it."""
    run(tmp_path, tokenizer_dir, trainer__max_steps=4)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "last").unlink()
    os.symlink("step-00000002.ckpt", ckpts / "last")
    (ckpts / ".step-00000006.ckpt.tmp").write_bytes(b"half a checkpoint")
    result, _ = run(tmp_path, tokenizer_dir, trainer__max_steps=6)
    assert result.global_step == 6
    import csv

    with open(tmp_path / "run" / "logs" / "csv" / "version_1" / "metrics.csv") as f:
        steps = {int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]}
    assert steps == {4, 5}  # the second launch continued from step 4, not from `last` (2)
    assert not (ckpts / ".step-00000006.ckpt.tmp").exists()
    assert os.readlink(ckpts / "last") == "step-00000006.ckpt"
