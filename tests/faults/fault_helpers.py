"""Helpers of the fault-injection suite: tiny runs in process, their final weights, damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lit_helpers import SyntheticDataModule, tiny_overrides

from longcpt.config import load_config
from longcpt.lit.train import train
from longcpt.manifest import manifest_path

STEPS = 6  # checkpoints at 2, 4 and 6 (tiny_overrides saves every 2 steps)


def make_data(folder: Path, tokenizer: Path, docs: int = 120) -> Path:
    """`folder/raw.jsonl` -> `folder/prepared/{train,val}` through `longcpt.data.prepare_corpus`."""
    from longcpt.data.prepare import prepare_corpus

    raw = folder / "raw.jsonl"
    with open(raw, "w") as f:
        for d in range(docs):
            tok = 3 + d % 90
            words = []
            for _ in range(8 + (d * 7) % 40):
                words.append(f"t{tok}")
                tok = 3 + (3 * tok + 1) % 93
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    prepare_corpus([raw], tokenizer, folder / "prepared", val_fraction=0.1, progress=False)
    return folder / "prepared"


def config(out: Path, tokenizer: Path, **extra):
    return load_config(None, tiny_overrides(out, tokenizer, **extra))


def run(out: Path, tokenizer: Path, callbacks=None, **extra):
    """`longcpt train` in process on the synthetic windows (what `--synthetic` runs)."""
    cfg = config(out, tokenizer, **extra)
    dm = SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size, cfg.trainer.seed)
    return train(cfg, datamodule=dm, callbacks=callbacks)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def zero_block(path: Path, size: int = 4096) -> None:
    """Zero `size` bytes in the middle of a file (same length: only a checksum can tell)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(size))


def delete(path: Path) -> None:
    path.unlink()


def garble_manifest(path: Path) -> None:
    manifest_path(path).write_text('{"format": "longcpt-checkpoint/1", "files": ')
