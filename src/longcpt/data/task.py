"""Fine-tuning on prompt -> answer tasks (passkey, BookSum): answer-only rows and their DataModule.

A task example is a prompt and a target (the answer or summary, ending with EOS). One example
fills one row of `seq_len` tokens, right-padded:

    tokens    BOS  p1   p2   p3   a1   a2   EOS  PAD  PAD
    labels    -100 -100 -100 a1   a2   EOS  -100 -100 -100     labels[t] = target of token t
    doc_lens  [7, 2]                                           the padding is one last pseudo-document

so the loss falls on the target only (the model is not trained to reproduce the filler or the
book). With `data.train_on_input=true` (torchtune's `train_on_input`) the prompt is trained on too,
labels[t] = tokens[t+1] everywhere but the padding: a warm-up stage for a small model that has not
learned to copy yet (the passkey prompt repeats its filler and its key; see docs/passkey_demo.sh). Rows have the window format of `pack_documents`, so the packed-data collator
(`longcpt.data.collate`) derives position ids and `cu_seqlens` per attention kind exactly as for
pretraining; nothing in the padding can reach the example (it comes after it, attention is
causal, and it is a document of its own).

The concrete tasks (`data/passkey.py`, `data/booksum.py`) read their files into (prompt, target)
pairs and register a `TaskDataModule` for `data.task`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from longcpt.batch import IGNORE_INDEX
from longcpt.data.collate import Collator
from longcpt.data.datamodule import ResumableDataModule
from longcpt.errors import LongcptError

Pairs = list[tuple[list[int], list[int]]]


def answer_only_row(
    prompt_ids: Sequence[int], target_ids: Sequence[int], seq_len: int, pad_id: int, train_on_input: bool = False
) -> dict:
    """One right-padded row with labels on `target_ids` only (on the prompt too with `train_on_input`).

    Args:
        prompt_ids: the prompt (BOS first when the tokenizer has one).
        target_ids: what the model must produce after the prompt (EOS included by the caller).
        seq_len: row length.
        pad_id: padding token.
        train_on_input: label the prompt's tokens as well (all but its first, which nothing predicts).

    Returns:
        {"input_ids": list, "labels": list, "doc_lens": list}: `seq_len` tokens, the window
        format of `pack_documents`.

    Raises:
        ValueError: prompt + target longer than `seq_len` (callers truncate first), or empty.
    """
    tokens = list(prompt_ids) + list(target_ids)
    n, p = len(tokens), len(prompt_ids)
    if n > seq_len or p == 0 or not target_ids:
        raise ValueError(f"prompt {p} + target {len(target_ids)} tokens: need both non-empty and <= {seq_len}")
    # labels[t] = tokens[t+1] for the positions whose next token is part of the target.
    first = 1 if train_on_input else p
    labels = [IGNORE_INDEX] * (first - 1) + tokens[first:] + [IGNORE_INDEX] * (seq_len - n + 1)
    return {
        "input_ids": tokens + [pad_id] * (seq_len - n),
        "labels": labels,
        "doc_lens": [n] + ([seq_len - n] if n < seq_len else []),
    }


def task_order(n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator[int]:
    """This rank's endless example order from its `start`-th example.

    Epoch e is a permutation of range(n) seeded by (seed, e), dealt round-robin to the ranks, so
    ranks read disjoint examples and a resumed run continues with exactly the next one.

    Raises:
        LongcptError: fewer examples than ranks (some rank would wait forever).
    """
    if n < world_size:
        raise LongcptError(f"{n} fine-tuning example(s) for {world_size} processes: need at least one per process")

    def endless() -> Iterator[int]:
        for epoch in itertools.count():
            yield from np.random.default_rng([seed, epoch]).permutation(n)[rank::world_size].tolist()

    return itertools.islice(endless(), start, None)


class _TaskRows(IterableDataset):
    """Rows of one rank in `order()`, split between DataLoader workers by batch (as pretraining)."""

    def __init__(self, pairs: Pairs, order: Callable[[], Iterator[int]], batch_size: int, row: Callable[..., dict]):
        self.pairs, self.order, self.batch_size, self.row = pairs, order, batch_size, row

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, example in enumerate(self.order()):
            if (i // self.batch_size) % workers == worker:
                prompt, target = self.pairs[example]
                yield self.row(prompt, target)


class TaskDataModule(ResumableDataModule):
    """DataModule over (prompt, target) pairs: seeded order, sharded by rank, exactly resumable.

    Args:
        cfg: the recipe (`longcpt.config.Config`); uses data.train/val/seq_len/micro_batch_size/
            num_workers/val_batches/train_on_input, attention.kind and trainer.seed.
        tokenizer: from `longcpt.data.load_tokenizer` (its pad id pads rows).
        load_pairs: `load_pairs(path, seq_len)` reads a data path into (prompt_ids, target_ids)
            pairs that fit `seq_len` (truncating or failing as the task decides).

    Resume is `ResumableDataModule`'s: the state holds the examples this rank consumed, counted
    from completed optimizer steps (workers prefetch, so fetched batches would overcount).
    """

    def __init__(self, cfg, tokenizer, load_pairs: Callable[[str, int], Pairs]):
        super().__init__(cfg.strategy.sequence_parallel)
        d = cfg.data
        self.cfg, self.load_pairs = cfg, load_pairs
        self.seq_len, self.micro_batch_size, self.seed = d.seq_len, d.micro_batch_size, cfg.trainer.seed
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise LongcptError("tokenizer has neither a pad nor an EOS token; task fine-tuning needs one to pad rows")
        self.pad_id = pad
        # (prompt, target) -> row; a partial, so DataLoader workers can pickle it.
        self._row = functools.partial(answer_only_row, seq_len=d.seq_len, pad_id=pad, train_on_input=d.train_on_input)
        self.collator = Collator(cfg.attention.kind)
        self.train_pairs: Pairs | None = None
        self.val_pairs: Pairs | None = None

    def setup(self, stage: str | None = None) -> None:
        self.take_shard()
        d = self.cfg.data
        if self.train_pairs is None:
            self.train_pairs = self.load_pairs(d.train, d.seq_len)
        if self.val_pairs is None and d.val:
            self.val_pairs = self.load_pairs(d.val, d.seq_len)

    def stream_identity(self) -> dict[str, Any]:
        n = len(self.train_pairs) if self.train_pairs is not None else None
        return {"seed": self.seed, "world_size": self.world_size, "seq_len": self.seq_len, "examples": n}

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        n, seed, rank, world, start = len(self.train_pairs), self.seed, self.rank, self.world_size, self.consumed_samples()
        task_order(n, seed, rank, world)  # fails early when there are fewer examples than ranks
        rows = _TaskRows(self.train_pairs, _Order(n, seed, rank, world, start), self.micro_batch_size, self._row)
        return DataLoader(rows, batch_size=self.micro_batch_size, collate_fn=self.collator,
                          num_workers=self.cfg.data.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("fit")
        if not self.val_pairs:
            return []
        limit, n, world = self.cfg.data.val_batches * self.micro_batch_size, len(self.val_pairs), self.world_size
        if n < world:  # too few to share out: every rank evaluates the same examples
            mine = self.val_pairs[:limit]
        else:  # the same count on every rank (ZeRO-3 deadlocks otherwise: `validation_share`)
            count = self.validation_share([len(range(r, n, world)) for r in range(world)], limit)
            mine = self.val_pairs[self.rank :: world][:count]
        rows = [self._row(p, t) for p, t in mine]
        return DataLoader(rows, batch_size=self.micro_batch_size, collate_fn=self.collator)


class _Order:
    """Picklable `task_order` with fixed arguments (DataLoader workers pickle the dataset)."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int, start: int):
        self.args = (n, seed, rank, world_size, start)

    def __call__(self) -> Iterator[int]:
        return task_order(*self.args)
