"""An endless, deterministic, resumable stream of packed windows (no torch, no Lightning).

The stream is a pure function of (documents, seed, rank, world size, packing): epoch e visits
the documents in the order `permutation(seed, e)`, rank r takes every world_size-th of them
(disjoint shards), and those documents are packed into windows. Epochs follow each other
forever; training stops at `max_steps`. Window k of a rank is therefore always the same, so
resuming means "start at window k", and k is just the number of windows consumed.

    epoch 0: perm(seed, 0) = [7 2 9 4 ...]   rank 0: 7 9 ...   rank 1: 2 4 ...
    epoch 1: perm(seed, 1) = [3 8 1 ...]     rank 0: 3 1 ...   rank 1: 8 ...
    windows of rank 0: | epoch 0 packed ... | epoch 1 packed ... | ...    index 0, 1, 2, ...

Finding window k needs only the document lengths (`plan_windows`), so skipping is cheap; only
the windows actually used read tokens (`TokenStore`, memory-mapped Arrow).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from longcpt.data.packing import DEFAULT_BFD_BUFFER, Piece, materialize_window, plan_windows
from longcpt.errors import LongcptError


class TokenStore:
    """Random access to the documents of a prepared data set (`prepare_corpus` / `mix` output).

    Holds only the path when pickled (DataLoader workers reopen the memory map themselves).

    Args:
        path: folder written by `save_to_disk` with an `input_ids` column.

    Raises:
        LongcptError: the folder is missing, is a split folder, or has no `input_ids` column.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._open()

    def _open(self) -> None:
        from datasets import Dataset, DatasetDict, load_from_disk

        if not self.path.exists():
            raise LongcptError(f"data set {str(self.path)!r} not found (create it with data_prep/prepare_corpus.py)")
        try:
            ds = load_from_disk(str(self.path))
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these too
            raise LongcptError(f"{str(self.path)!r} is not a readable data set: {_damage(self.path) or e}; "
                               "create it again with data_prep/prepare_corpus.py") from None
        if isinstance(ds, DatasetDict):
            raise LongcptError(f"{str(self.path)!r} holds the splits {', '.join(ds)}; point to one of them, "
                               f"e.g. {self.path / next(iter(ds))}")
        assert isinstance(ds, Dataset)
        if "input_ids" not in ds.column_names:
            raise LongcptError(f"data set {str(self.path)!r} has no input_ids column (columns: "
                               f"{', '.join(ds.column_names)}); create it with data_prep/prepare_corpus.py")
        table = ds.data.table if ds._indices is None else ds.flatten_indices().data.table
        col = table.column("input_ids")
        self._values = [c.values.to_numpy(zero_copy_only=False) for c in col.chunks]  # mmap views
        self._offsets = [np.asarray(c.offsets.to_numpy(zero_copy_only=False), dtype=np.int64) for c in col.chunks]
        for chunk, (values, offsets) in enumerate(zip(self._values, self._offsets)):
            if len(offsets) and (offsets[0] < 0 or offsets[-1] > len(values) or np.any(np.diff(offsets) < 0)):
                raise LongcptError(f"data set {str(self.path)!r}: record batch {chunk} has inconsistent document "
                                   "offsets (a damaged Arrow shard); create it again with "
                                   "data_prep/prepare_corpus.py")
        counts = [len(o) - 1 for o in self._offsets]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first doc of each chunk
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]) if counts else np.zeros(0, np.int64)
        self.dataset = ds  # the `datasets.Dataset` (keeps the memory map alive)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        c = int(np.searchsorted(self._first, i, side="right")) - 1
        j = i - int(self._first[c])
        off = self._offsets[c]
        return self._values[c][off[j] : off[j + 1]]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._open()


def _damage(path: Path) -> str | None:
    """Which Arrow shard of a saved data set is missing or unreadable, and why (None: all read)."""
    import json

    import pyarrow as pa

    try:
        shards = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name in shards:
        try:
            with pa.memory_map(str(path / name)) as source:
                pa.ipc.open_stream(source).read_all()
        except FileNotFoundError:
            return f"its shard {name} is missing"
        except (OSError, ValueError, pa.ArrowException) as e:
            return f"its shard {name} is damaged ({e})"
    return None


class WindowStream:
    """The window plan of one rank: `(index, pieces)` pairs, endless or for a number of epochs.

    Args:
        lengths: tokens per document of the whole data set.
        seq_len: window length.
        strategy: `chunk` or `bfd`.
        seed: shuffling seed (epoch e uses seed and e).
        shuffle: False keeps the stored order in every epoch (validation).
        rank, world_size: this rank's shard is every world_size-th document of the epoch order.
        buffer_size: documents per `bfd` buffer.

    Raises:
        LongcptError: fewer documents than ranks (some rank would get no data).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        seq_len: int,
        strategy: str = "chunk",
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        buffer_size: int = DEFAULT_BFD_BUFFER,
    ):
        if len(lengths) < world_size:
            raise LongcptError(f"the data set has {len(lengths)} document(s) for {world_size} ranks; "
                               "every rank needs at least one (add data or use fewer devices)")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.seq_len, self.strategy, self.buffer_size = seq_len, strategy, buffer_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size

    def epoch_documents(self, epoch: int) -> np.ndarray:
        """Indices of this rank's documents in epoch `epoch`, in visiting order."""
        n = len(self.lengths)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank :: self.world_size]

    def plan(self, start: int = 0, epochs: int | None = None) -> Iterator[tuple[int, list[Piece]]]:
        """Windows from index `start` on, pieces naming data-set document indices.

        Args:
            start: index of the first window to yield (earlier ones are planned, not built).
            epochs: stop after this many epochs (None: endless).
        """
        index, epoch = 0, 0
        while epochs is None or epoch < epochs:
            docs = self.epoch_documents(epoch)
            for pieces in plan_windows(self.lengths[docs].tolist(), self.seq_len, self.strategy, self.buffer_size):
                if index >= start:
                    yield index, [Piece(int(docs[p.doc]), p.lo, p.hi) for p in pieces]
                index += 1
            epoch += 1

    def windows(self, store: TokenStore, start: int = 0, epochs: int | None = None, *, bos_id: int,
                eos_id: int, pad_id: int) -> Iterator[dict]:
        """Built windows (`pack_documents` format) from index `start` on."""
        for _, pieces in self.plan(start, epochs):
            yield materialize_window(pieces, store.__getitem__, self.seq_len, bos_id=bos_id, eos_id=eos_id,
                                     pad_id=pad_id)
