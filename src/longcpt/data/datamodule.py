"""LightningDataModules, picked by `data.task` from a small registry.

`build_datamodule(cfg, tokenizer)` looks `cfg.data.task` up in `DATAMODULES`. A task module
registers itself in one line::

    @register_datamodule("passkey")
    class PasskeyDataModule(L.LightningDataModule):
        @classmethod
        def from_config(cls, cfg, tokenizer): ...

and a task not registered yet is imported from `longcpt.data.<task>` on first use, so
`passkey.py` / `booksum.py` in this package need no edit here, nor anywhere else: recipes are
checked against this registry (`task_problems`).

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

Sequence parallelism (`strategy.sequence_parallel: N`): the N ranks of a group share each window,
so they read the same stream. Data is sharded over world_size / N data-parallel ranks
(`longcpt.strategies.data_parallel_coordinates`), and `rank`/`world_size` below mean those.
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
from longcpt.strategies import data_parallel_coordinates

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


def _registered(task: str) -> bool:
    """Is `task` registered, once `longcpt.data.<task>` (where it would register) is imported?"""
    if task not in DATAMODULES and task.isidentifier():
        try:
            importlib.import_module(f"longcpt.data.{task}")
        except ModuleNotFoundError as e:
            if e.name != f"longcpt.data.{task}":
                raise
    return task in DATAMODULES


def known_tasks() -> list[str]:
    """Every registered task, after importing each module of `longcpt.data` (for messages)."""
    import pkgutil

    import longcpt.data

    for module in pkgutil.iter_modules(longcpt.data.__path__):
        _registered(module.name)
    return sorted(DATAMODULES)


def task_problems(task: str) -> list[str]:
    """[] when a DataModule is registered for `task`, else the problem naming the known tasks."""
    if _registered(task):
        return []
    import difflib

    known = known_tasks()
    close = difflib.get_close_matches(task, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return [f"data.task={task!r}: no DataModule registered for it (known: {', '.join(known)}){hint}"]


def build_datamodule(cfg, tokenizer) -> L.LightningDataModule:
    """The DataModule for `cfg.data.task`, built from the recipe and the loaded tokenizer.

    Args:
        cfg: a `longcpt.config.Config`.
        tokenizer: from `longcpt.data.load_tokenizer` (BOS/EOS/PAD ids set).

    Raises:
        LongcptError: no DataModule for the task, or bad data paths.
    """
    problems = task_problems(cfg.data.task)
    if problems:
        raise LongcptError(problems[0])
    return DATAMODULES[cfg.data.task](cfg, tokenizer)


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

    Subclasses set `micro_batch_size`, call `take_shard()` in `setup` (it sets `rank` and
    `world_size`, the data-parallel ones), start their loader at `consumed_samples()`, and describe
    their stream in `stream_identity()`: a checkpoint whose stream differs (another seed, world
    size, data set) resumes with a warning naming what changed.

    Args:
        sequence_parallel: ranks sharing each window (`strategy.sequence_parallel`).
    """

    def __init__(self, sequence_parallel: int = 1) -> None:
        super().__init__()
        self.micro_batch_size, self.rank, self.world_size = 1, 0, 1
        self.sequence_parallel = sequence_parallel
        self._resumed_at = (0, 0)  # (samples consumed, global step) at the last load_state_dict

    def take_shard(self) -> None:
        """Set `rank`/`world_size` to this process's data-parallel shard (when a trainer is attached)."""
        if self.trainer is not None:
            self.rank, self.world_size = data_parallel_coordinates(
                self.trainer.global_rank, self.trainer.world_size, self.sequence_parallel)

    def stream_identity(self) -> dict[str, Any]:
        """What must be equal for a resumed stream to continue exactly where it stopped."""
        return {"world_size": self.world_size}

    def missing_data(self) -> str | None:
        """`key=path` of a data folder that vanished since the run started, or None.

        Checked by the trainer after every optimizer step (a stat or two), so that a run whose
        data disappears (a scratch purge, a colleague's `rm`) stops with a checkpoint and a message
        instead of failing at its next read. Subclasses reading from folders override it.
        """
        return None

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
        sequence_parallel: ranks sharing each window (they read the same windows).
        vocab_size: the tokenizer's size; a window with a token id at or above it (a damaged
            shard, or data prepared with another tokenizer) stops the run naming the data set.
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
        attention_kind: str,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        bfd_buffer: int = DEFAULT_BFD_BUFFER,
        sequence_parallel: int = 1,
        vocab_size: int | None = None,
    ):
        super().__init__(sequence_parallel)
        self.train_path, self.val_path = Path(train), (Path(val) if val is not None else None)
        self.vocab_size = vocab_size
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
                   sequence_parallel=cfg.strategy.sequence_parallel,
                   vocab_size=len(tokenizer) if hasattr(tokenizer, "__len__") else None,
                   **special_ids(tokenizer))

    def setup(self, stage: str | None = None) -> None:
        self.take_shard()
        if self._train_store is None:
            self._train_store = TokenStore(self.train_path)
        self.train_stream = WindowStream(
            self._train_store.lengths, self.seq_len, self.packing, seed=self.seed, rank=self.rank,
            world_size=self.world_size, buffer_size=self.bfd_buffer,
        )

    def stream_identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "world_size": self.world_size, "seq_len": self.seq_len, "packing": self.packing,
                "num_documents": len(self._train_store) if self._train_store is not None else None}

    def missing_data(self) -> str | None:
        for key, path in (("data.train", self.train_path), ("data.val", self.val_path)):
            if path is not None and not (path / "state.json").is_file():  # written by save_to_disk
                return f"{key}={str(path)!r}"
        return None

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # In the main process (an error raised in a DataLoader worker reaches the user wrapped in
        # that worker's traceback); one max over the batch.
        if self.vocab_size is not None and batch["input_ids"].numel():
            top = int(batch["input_ids"].max())
            if top >= self.vocab_size:
                training = self.trainer is None or self.trainer.training
                key, path = ("data.train", self.train_path) if training else ("data.val", self.val_path)
                raise LongcptError(f"{key}={str(path)!r}: a window holds token id {top} but the tokenizer has "
                                   f"{self.vocab_size} tokens: the data set is damaged or was prepared with another "
                                   "tokenizer; create it again with data_prep/prepare_corpus.py")
        return batch

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
