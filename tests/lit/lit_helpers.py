"""Shared by the training and export tests: a tiny tokenizer, a synthetic resumable DataModule, a
tiny recipe, and runners of `train` in child processes: `train_ok` as fork server children (one
per rank), `run_train` as a fresh `python` whose other ranks Lightning's launcher starts.
`read_metrics` (a run's CSV logs by metric and step) is `longcpt.lit.logs.read_metrics`.

The DataModule mimics the `longcpt.data` contract the trainer relies on: packed windows
`{"input_ids", "labels", "position_ids", "cu_seqlens"}` with aligned labels, its own sharding by
rank, and a `state_dict` holding how many batches training consumed, so that a resumed run
continues with exactly the next batch.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from longcpt.lit.logs import read_metrics  # noqa: F401 (the tests import it from here)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 96
PAD, BOS, EOS = 0, 1, 2


def window(index: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """One packed window: documents following `next = (3 * prev + 1) mod (V - 3)` (learnable)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    ids, labels, starts = [], [], []
    while len(ids) < seq_len:
        n = int(torch.randint(4, seq_len // 2 + 2, (1,), generator=g))
        tok = int(torch.randint(3, VOCAB, (1,), generator=g))
        doc = [BOS]
        for _ in range(n):
            doc.append(tok)
            tok = 3 + (3 * tok + 1) % (VOCAB - 3)
        doc = doc[: seq_len - len(ids)]
        starts.append(len(ids))
        ids += doc
        labels += doc[1:] + [-100]
    pos = torch.arange(seq_len)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": pos,
            "starts": torch.tensor(starts)}


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    t = rows[0]["input_ids"].numel()
    starts = torch.cat([r["starts"] + i * t for i, r in enumerate(rows)] + [torch.tensor([len(rows) * t])])
    return {
        "input_ids": torch.stack([r["input_ids"] for r in rows]),
        "labels": torch.stack([r["labels"] for r in rows]),
        "position_ids": torch.stack([r["position_ids"] for r in rows]),
        "cu_seqlens": starts.to(torch.int32),
    }


class Windows(Dataset):
    def __init__(self, seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return window(index, self.seq_len, self.seed)


class FromBatch(Sampler):
    """Indices rank, rank+world, ... starting after `start` consumed batches of `batch` windows."""

    def __init__(self, start: int, batch: int, rank: int, world: int):
        self.start, self.batch, self.rank, self.world = start, batch, rank, world

    def __iter__(self):
        i = self.start * self.batch
        while True:
            yield i * self.world + self.rank
            i += 1

    def __len__(self) -> int:
        return 1_000_000


def restart_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Position ids restarting at 0 in every document (what `intra_doc` and `infini` expect)."""
    flat = torch.arange(batch["input_ids"].numel())
    starts = batch["cu_seqlens"].long()
    doc = torch.searchsorted(starts, flat, right=True) - 1
    batch["position_ids"] = (flat - starts[doc]).view_as(batch["input_ids"])
    return batch


class SyntheticDataModule(pl.LightningDataModule):
    """Windows by data-parallel rank: the `sequence_parallel` ranks of a group read the same ones."""

    def __init__(self, seq_len: int, micro_batch_size: int, seed: int = 0, val: bool = True,
                 restart: bool = False, sequence_parallel: int = 1):
        super().__init__()
        self.seq_len, self.batch, self.seed, self.val = seq_len, micro_batch_size, seed, val
        self.collate = (lambda rows: restart_positions(collate(rows))) if restart else collate
        self.sequence_parallel = sequence_parallel
        self.consumed = 0

    def train_dataloader(self):
        from longcpt.strategies import data_parallel_coordinates

        rank, world = data_parallel_coordinates(self.trainer.global_rank, self.trainer.world_size,
                                                self.sequence_parallel)
        sampler = FromBatch(self.consumed, self.batch, rank, world)
        return DataLoader(Windows(self.seq_len, self.seed), batch_size=self.batch, sampler=sampler,
                          collate_fn=self.collate)

    def val_dataloader(self):
        if not self.val:
            return []
        rows = [window(10_000_000 + i, self.seq_len, self.seed) for i in range(2 * self.batch)]
        return DataLoader(rows, batch_size=self.batch, collate_fn=self.collate)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training:
            self.consumed += 1  # a batch reaches the training step only through here
            time.sleep(float(os.environ.get("SYNTHETIC_BATCH_SLEEP", "0")))  # lets tests act mid-run
        return batch

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.consumed = state["consumed"]


def make_corpus(folder: Path) -> dict[str, Path]:
    """A small real corpus through `longcpt.data`: stdlib text -> BPE tokenizer -> train/val sets."""
    from longcpt.data.demo_corpus import build_demo_corpus
    from longcpt.data.prepare import prepare_corpus
    from longcpt.data.tokenizer import train_tokenizer

    corpus = build_demo_corpus(folder, max_docs=200, max_bytes=200_000)
    train_tokenizer([corpus], 300, folder / "tokenizer")
    prepare_corpus([corpus], folder / "tokenizer", folder / "data", val_fraction=0.1, progress=False)
    return {"tokenizer": folder / "tokenizer", "train": folder / "data" / "train", "val": folder / "data" / "val"}


def tiny_overrides(out_dir: Path, tokenizer: Path, corpus: dict | None = None, **extra) -> list[str]:
    """Dotlist for a 2-layer, 64-wide Llama: on `corpus` (make_corpus) with windows of 64 tokens,
    or without it on synthetic windows of 32 tokens (run with --synthetic)."""
    base = {
        "model.tokenizer": str(corpus["tokenizer"] if corpus else tokenizer),
        "model.config": "{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,"
        " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}",
        "attention.kind": "full",
        "data.seq_len": 64 if corpus else 32,
        "data.micro_batch_size": 2,
        "data.num_workers": 0,
        "data.val_batches": 2,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "trainer.out_dir": str(out_dir),
        "trainer.max_steps": 6,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.precision": "32-true",
        "trainer.save_every_n_steps": 2,
        "trainer.log_every_n_steps": 1,
        "trainer.val_every_n_steps": 1000,
    }
    if corpus:
        base.update({"data.train": str(corpus["train"]), "data.val": str(corpus["val"])})
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def run_train(overrides: list[str], *flags: str, env: dict | None = None, timeout: float = 600, wait: bool = True):
    """Start tests/lit/run_train.py in a fresh subprocess (flags: --synthetic, --die-in-save N): with
    trainer.devices > 1, Lightning's launcher starts the other ranks, as for a user's `longcpt train`."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(REPO / "tests" / "lit" / "run_train.py"), *flags, *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_ok(forkserver, overrides: list[str], logs: Path, world: int = 1, timeout: float = 600) -> str:
    """tests/lit/run_train.py with `overrides` (and its flags) as `world` fork server children, one
    per rank (tests/forkserver.py), which must all succeed; a failure shows the end of its output.

    Returns:
        Rank 0's output (stdout and stderr); each rank's is in `logs`-RANK.log.
    """
    if world == 1:
        ranks = [forkserver.run("run_train", overrides, logs.with_name(f"{logs.name}-0.log"), timeout=timeout)]
    else:
        ranks = forkserver.run_ranks("run_train", overrides, logs, world=world, timeout=timeout)
    for child in ranks:
        assert child.returncode == 0, child.output()[-4000:]
    return ranks[0].output()


def fake_scontrol(folder: Path) -> Path:
    """A folder holding an `scontrol` (put it on PATH) that records its arguments in calls.txt."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls.txt"}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def start_up_state(pid: int) -> tuple[bool, bool] | None:
    """(catches SIGUSR1, has loaded torch) for process `pid`; None once it is gone. The status is
    read before the memory map, so (True, False) means the handler was there before torch."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        maps = Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(caught & (1 << (signal.SIGUSR1 - 1))), "libtorch" in maps


def wait_for_early_start(pids: list[int], timeout: float = 30.0) -> bool:
    """Wait until each process in `pids` catches SIGUSR1 or has loaded torch, whichever comes first
    (the start of `longcpt train`, long before the training loop's own handler). True if every one
    caught SIGUSR1 before loading torch; False if one loaded torch first (a version that installs no
    handler so early, which a SIGUSR1 sent now kills), is gone, or `timeout` seconds passed."""
    early: dict[int, bool] = {}
    deadline = time.monotonic() + timeout
    while len(early) < len(pids) and time.monotonic() < deadline:
        for pid in set(pids) - set(early):
            state = start_up_state(pid)
            if state is None or any(state):
                early[pid] = state is not None and state == (True, False)
        time.sleep(0.01)
    return len(early) == len(pids) and all(early.values())
