"""LightningDataModules, picked by `data.task` from a small registry.

`build_datamodule(cfg, tokenizer)` looks `cfg.data.task` up in `DATAMODULES`. A task module
registers itself in one line::

    @register_datamodule("passkey")
    class PasskeyDataModule(L.LightningDataModule):
        @classmethod
        def from_config(cls, cfg, tokenizer): ...

and a task not registered yet is imported from `longcpt.data.<task>` on first use, so
`passkey.py` / `booksum.py` in this package need no edit here.

`PretrainDataModule` wires `WindowStream` (deterministic, sharded, endless) to DataLoaders.
Exact resume: its `state_dict()` (saved by Lightning in every checkpoint) holds the number of
windows this rank has consumed, computed at save time as

    consumed = consumed at the last resume + (global_step - step at the last resume)
               * accumulate_grad_batches * micro_batch_size

Checkpoints are taken at optimizer-step boundaries (a half-accumulated step is redone after a
resume, which is right), and every window of those steps was consumed. On resume Lightning calls
`load_state_dict` before `train_dataloader`, which then starts the stream at that window. Workers
do not change the stream: batch b always holds windows b*B .. b*B+B-1, built by worker
b % num_workers, the order in which the DataLoader collects batches from its workers. (Counting
fetched batches instead would be wrong: workers prefetch ahead of training.)
"""

from __future__ import annotations

import importlib
import itertools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from longcpt.data.collate import Collator
from longcpt.data.packing import DEFAULT_BFD_BUFFER, materialize_window
from longcpt.data.stream import TokenStore, WindowStream
from longcpt.data.tokenizer import special_ids
from longcpt.errors import LongcptError

DATAMODULES: dict[str, Callable[[Any, Any], L.LightningDataModule]] = {}


def register_datamodule(task: str):
    """Decorator registering a DataModule factory for `data.task == task`.

    Decorate a class with a `from_config(cfg, tokenizer)` classmethod, or a function
    `(cfg, tokenizer) -> LightningDataModule`. Returns the decorated object unchanged.
    """

    def add(obj):
        DATAMODULES[task] = getattr(obj, "from_config", obj)
        return obj

    return add


def build_datamodule(cfg, tokenizer) -> L.LightningDataModule:
    """The DataModule for `cfg.data.task`, built from the recipe and the loaded tokenizer.

    Args:
        cfg: a `longcpt.config.Config`.
        tokenizer: from `longcpt.data.load_tokenizer` (BOS/EOS/PAD ids set).

    Raises:
        LongcptError: no DataModule for the task, or bad data paths.
    """
    task = cfg.data.task
    if task not in DATAMODULES:
        try:
            importlib.import_module(f"longcpt.data.{task}")
        except ModuleNotFoundError as e:
            if e.name != f"longcpt.data.{task}":
                raise
        if task not in DATAMODULES:
            raise LongcptError(f"data.task={task!r}: no DataModule registered for it "
                               f"(known: {', '.join(sorted(DATAMODULES)) or 'none'})")
    return DATAMODULES[task](cfg, tokenizer)


class _TrainWindows(IterableDataset):
    """This rank's endless window stream from `start`, split between DataLoader workers by batch."""

    def __init__(self, store: TokenStore, stream: WindowStream, start: int, batch_size: int, ids: dict):
        self.store, self.stream, self.start, self.batch_size, self.ids = store, stream, start, batch_size, ids

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, pieces in self.stream.plan(self.start):
            if ((index - self.start) // self.batch_size) % workers == worker:
                yield materialize_window(pieces, self.store.__getitem__, self.stream.seq_len, **self.ids)


class ResumableDataModule(L.LightningDataModule):
    """Exact resume for DataModules that read one endless stream per rank (see the module docstring).

    Subclasses set `micro_batch_size`, `rank` and `world_size`, start their loader at
    `consumed_samples()`, and describe their stream in `stream_identity()`: a checkpoint whose
    stream differs (another seed, world size, data set) resumes with a warning naming what changed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.micro_batch_size, self.rank, self.world_size = 1, 0, 1
        self._resumed_at = (0, 0)  # (samples consumed, global step) at the last load_state_dict

    def stream_identity(self) -> dict[str, Any]:
        """What must be equal for a resumed stream to continue exactly where it stopped."""
        return {"world_size": self.world_size}

    @staticmethod
    def validation_share(shard_sizes: list[int], limit: int) -> int:
        """Validation items every rank takes: the smallest rank's shard, at most `limit`.

        Every rank must run the same number of validation batches. Under DeepSpeed ZeRO-3 every
        forward all-gathers the parameters, so a rank with one batch more waits forever for the
        others (validation sharded by document gives uneven window counts at 64K-128K).
        """
        return min([limit, *shard_sizes])

    def consumed_samples(self) -> int:
        """Samples of this rank's stream consumed by completed optimizer steps."""
        consumed, step = self._resumed_at
        if self.trainer is None:
            return consumed
        per_step = self.trainer.accumulate_grad_batches * self.micro_batch_size
        return consumed + (self.trainer.global_step - step) * per_step

    def state_dict(self) -> dict[str, Any]:
        step = self.trainer.global_step if self.trainer is not None else self._resumed_at[1]
        return {"consumed_samples": self.consumed_samples(), "global_step": step, **self.stream_identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_at = (int(state["consumed_samples"]), int(state["global_step"]))
        now = self.stream_identity()
        changed = [f"{k} {state.get(k)} -> {v}" for k, v in now.items() if state.get(k) is not None and state.get(k) != v]
        if changed:
            warnings.warn("resuming with a different data stream (" + "; ".join(changed) + "): training continues "
                          f"after sample {self._resumed_at[0]} of the new stream, not exactly where it stopped",
                          stacklevel=2)


@register_datamodule("pretrain")
class PretrainDataModule(ResumableDataModule):
    """Packed pretraining windows: deterministic from the seed, sharded by rank, exactly resumable.

    Args:
        train: prepared data set folder (`prepare_corpus` / `mix` output).
        val: prepared validation data set folder, or None.
        seq_len: window length.
        packing: `chunk` or `bfd`.
        micro_batch_size: windows per batch.
        num_workers: DataLoader worker processes for training.
        val_batches: validation batches (the first windows of the unshuffled val set).
        seed: shuffling seed (`trainer.seed`).
        attention_kind: decides the position ids (see `collate.py`).
        bos_id, eos_id, pad_id: special token ids.
        bfd_buffer: documents per best-fit-decreasing buffer.
    """

    def __init__(
        self,
        train: str | Path,
        val: str | Path | None = None,
        *,
        seq_len: int,
        packing: str = "chunk",
        micro_batch_size: int = 1,
        num_workers: int = 0,
        val_batches: int = 8,
        seed: int = 0,
        attention_kind: str = "anchor",
        bos_id: int,
        eos_id: int,
        pad_id: int,
        bfd_buffer: int = DEFAULT_BFD_BUFFER,
    ):
        super().__init__()
        self.train_path, self.val_path = Path(train), (Path(val) if val is not None else None)
        self.seq_len, self.packing, self.micro_batch_size = seq_len, packing, micro_batch_size
        self.num_workers, self.val_batches, self.seed, self.bfd_buffer = num_workers, val_batches, seed, bfd_buffer
        self.ids = {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}
        self.collator = Collator(attention_kind)
        self._train_store: TokenStore | None = None
        self._val_windows: list[dict] | None = None

    @classmethod
    def from_config(cls, cfg, tokenizer) -> PretrainDataModule:
        """Build from a recipe (`data.*`, `trainer.seed`, `attention.kind`) and its tokenizer."""
        d = cfg.data
        return cls(d.train, d.val, seq_len=d.seq_len, packing=d.packing, micro_batch_size=d.micro_batch_size,
                   num_workers=d.num_workers, val_batches=d.val_batches, seed=cfg.trainer.seed,
                   attention_kind=cfg.attention.kind, bfd_buffer=d.bfd_buffer,
                   **special_ids(tokenizer))

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self._train_store is None:
            self._train_store = TokenStore(self.train_path)
        self.train_stream = WindowStream(
            self._train_store.lengths, self.seq_len, self.packing, seed=self.seed, rank=self.rank,
            world_size=self.world_size, buffer_size=self.bfd_buffer,
        )

    def stream_identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "world_size": self.world_size, "seq_len": self.seq_len, "packing": self.packing,
                "num_documents": len(self._train_store) if self._train_store is not None else None}

    # ---- loaders -----------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        if self._train_store is None:
            self.setup("fit")
        dataset = _TrainWindows(self._train_store, self.train_stream, self.consumed_samples(),
                                self.micro_batch_size, self.ids)
        return DataLoader(dataset, batch_size=self.micro_batch_size, collate_fn=self.collator,
                          num_workers=self.num_workers, persistent_workers=False)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_path is None:
            return []
        if self._val_windows is None:
            store = TokenStore(self.val_path)
            # Each rank evaluates its own shard; a validation set smaller than the world is used
            # whole by every rank instead (a few long documents are a common validation set).
            rank, world = (self.rank, self.world_size) if len(store) >= self.world_size else (0, 1)

            def stream(r: int) -> WindowStream:
                return WindowStream(store.lengths, self.seq_len, self.packing, shuffle=False, rank=r,
                                    world_size=world, buffer_size=self.bfd_buffer)

            # Every rank runs as many windows as the smallest shard has (`validation_share`); the
            # window plans need only document lengths, so each rank counts the others' itself.
            limit = self.val_batches * self.micro_batch_size
            sizes = [sum(1 for _ in itertools.islice(stream(r).plan(epochs=1), limit)) for r in range(world)]
            count = self.validation_share(sizes, limit)
            windows = stream(rank).windows(store, epochs=1, **self.ids)
            self._val_windows = [w for _, w in zip(range(count), windows)]
        return DataLoader(self._val_windows, batch_size=self.micro_batch_size, collate_fn=self.collator)
