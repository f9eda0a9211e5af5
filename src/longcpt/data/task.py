"""Fine-tuning on prompt -> answer tasks (passkey, BookSum): answer-only rows and their DataModule.

A task example is a prompt and a target (the answer or summary, ending with EOS). One example
fills one row of `seq_len` tokens, right-padded:

    tokens    BOS  p1   p2   p3   a1   a2   EOS  PAD  PAD
    labels    -100 -100 -100 a1   a2   EOS  -100 -100 -100     labels[t] = target of token t
    doc_lens  [7, 2]                                           the padding is one last pseudo-document

so the loss falls on the target only (the model is not trained to reproduce the filler or the
book). With `data.train_on_input=true` (torchtune's `train_on_input`) the prompt is trained on too,
labels[t] = tokens[t+1] everywhere but the padding: a warm-up stage for a small model that has not
learned to copy yet (the passkey prompt repeats its filler and its key; see experiments/passkey_demo.sh). Rows have the window format of `pack_documents`, so the packed-data collator
(`longcpt.data.collate`) derives position ids and `cu_seqlens` per attention kind exactly as for
pretraining; nothing in the padding can reach the example (it comes after it, attention is
causal, and it is a document of its own).

With `data.pack_examples=true` several examples share a row, each a document of its own (the
document-masking kinds keep them apart exactly as packed pretraining documents), placed by
best-fit decreasing over `data.bfd_buffer` examples and never split:

    tokens    BOS  p1   a1   EOS  BOS  q1   q2   b1   EOS  PAD
    labels    -100 a1   EOS  -100 -100 -100 b1   EOS  -100 -100
    doc_lens  [4, 5, 1]

Prompts of mixed lengths then cost their own tokens instead of a full padded row each.

The concrete tasks (`data/passkey.py`, `data/booksum.py`) read their files into (prompt, target)
pairs and register a `TaskDataModule` for `data.task`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from longcpt.batch import IGNORE_INDEX
from longcpt.data.collate import Collator
from longcpt.data.datamodule import ResumableDataModule
from longcpt.data.packing import best_fit_decreasing
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
    return packed_row([(prompt_ids, target_ids)], seq_len, pad_id, train_on_input)


def packed_row(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int,
               train_on_input: bool = False) -> dict:
    """Examples side by side in one right-padded row, each a document of its own.

    Args:
        examples: (prompt_ids, target_ids) pairs, as `answer_only_row` takes one.
        seq_len, pad_id, train_on_input: as `answer_only_row`.

    Returns:
        {"input_ids": list, "labels": list, "doc_lens": list} of `seq_len` tokens: one document
        per example, then the padding as one last pseudo-document.

    Raises:
        ValueError: an empty prompt or target, or examples longer than `seq_len` together.
    """
    tokens: list[int] = []
    labels: list[int] = []
    doc_lens: list[int] = []
    for prompt, target in examples:
        if not prompt or not target:
            raise ValueError(f"prompt {len(prompt)} + target {len(target)} tokens: need both non-empty")
        example = list(prompt) + list(target)
        # labels[t] = example[t+1] for the positions whose next token is part of the target.
        first = 1 if train_on_input else len(prompt)
        labels += [IGNORE_INDEX] * (first - 1) + example[first:] + [IGNORE_INDEX]
        tokens += example
        doc_lens.append(len(example))
    n = len(tokens)
    if n > seq_len:
        raise ValueError(f"examples of {n} tokens together (prompt + target): need <= {seq_len}")
    return {
        "input_ids": tokens + [pad_id] * (seq_len - n),
        "labels": labels + [IGNORE_INDEX] * (seq_len - n),
        "doc_lens": doc_lens + ([seq_len - n] if n < seq_len else []),
    }


def pack_examples(sizes: Sequence[int], order: Iterable[int], seq_len: int, buffer_size: int,
                  seed: int = 0) -> Iterator[list[int]]:
    """Groups of examples that share a row, from the example order and the examples' sizes.

    Each `buffer_size` examples of `order` are placed by best-fit decreasing (an example is never
    split; every one fits a row by itself), and that buffer's rows come out in a seeded random
    order, so that a step does not see all the long examples of a buffer at once. A pure
    function of its arguments: a resumed run recomputes it and skips the rows it consumed.

    Args:
        sizes: tokens of each example (prompt + target).
        order: example indices, in stream order (endless for training).
        seq_len: row length.
        buffer_size: examples placed together.
        seed: seeds the order of the rows within each buffer.

    Returns:
        An iterator of rows, each a list of example indices.
    """
    examples = iter(order)
    for index in itertools.count():
        buffer = list(itertools.islice(examples, buffer_size))
        if not buffer:
            return
        rows = best_fit_decreasing([sizes[e] for e in buffer], seq_len)
        for r in np.random.default_rng([seed, index]).permutation(len(rows)).tolist():
            yield [buffer[i] for i in rows[r]]


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
    """Rows of one rank, one per group of `groups()` (example indices), split between DataLoader
    workers by batch (as pretraining)."""

    def __init__(self, pairs: Pairs, groups: Callable[[], Iterator[list[int]]], batch_size: int,
                 row: Callable[..., dict]):
        self.pairs, self.groups, self.batch_size, self.row = pairs, groups, batch_size, row

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, group in enumerate(self.groups()):
            if (i // self.batch_size) % workers == worker:
                yield self.row([self.pairs[e] for e in group])


class TaskDataModule(ResumableDataModule):
    """DataModule over (prompt, target) pairs: seeded order, sharded by rank, exactly resumable.

    Args:
        cfg: the recipe (`longcpt.config.Config`); uses data.train/val/seq_len/micro_batch_size/
            num_workers/val_batches/train_on_input/pack_examples/bfd_buffer, attention.kind and trainer.seed.
        tokenizer: from `longcpt.data.load_tokenizer` (its pad id pads rows).
        load_pairs: `load_pairs(path, seq_len)` reads a data path into (prompt_ids, target_ids)
            pairs that fit `seq_len` (truncating or failing as the task decides).

    Resume is `ResumableDataModule`'s: the state holds the rows this rank consumed, counted from
    completed optimizer steps (workers prefetch, so fetched batches would overcount); packed rows
    are a pure function of the example order, so a resumed run replans them and skips as many.
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
        self.pack, self.bfd_buffer = d.pack_examples, d.bfd_buffer
        # [(prompt, target), ...] -> row; a partial, so DataLoader workers can pickle it.
        self._row = functools.partial(packed_row, seq_len=d.seq_len, pad_id=pad, train_on_input=d.train_on_input)
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
        return {"seed": self.seed, "world_size": self.world_size, "seq_len": self.seq_len, "examples": n,
                "pack_examples": self.pack}

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        n, seed, rank, world, start = len(self.train_pairs), self.seed, self.rank, self.world_size, self.consumed_samples()
        task_order(n, seed, rank, world)  # fails early when there are fewer examples than ranks
        sizes = [len(p) + len(t) for p, t in self.train_pairs] if self.pack else None
        groups = _RowGroups(n, seed, rank, world, start, sizes, self.seq_len, self.bfd_buffer)
        rows = _TaskRows(self.train_pairs, groups, self.micro_batch_size, self._row)
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
        groups = [[i] for i in range(len(mine))]
        if self.pack:
            groups = list(pack_examples([len(p) + len(t) for p, t in mine], range(len(mine)), self.seq_len,
                                        self.bfd_buffer, self.seed))
        rows = [self._row([mine[i] for i in group]) for group in groups]
        return DataLoader(rows, batch_size=self.micro_batch_size, collate_fn=self.collator)


class _RowGroups:
    """Picklable plan of one rank's rows from its `start`-th row (DataLoader workers pickle the
    dataset): one example per row, or `pack_examples` groups when `sizes` is given."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int, start: int,
                 sizes: list[int] | None = None, seq_len: int = 0, buffer_size: int = 1):
        self.order_args, self.start = (n, seed, rank, world_size), start
        self.sizes, self.seq_len, self.buffer_size = sizes, seq_len, buffer_size

    def __call__(self) -> Iterator[list[int]]:
        if self.sizes is None:
            return ([e] for e in task_order(*self.order_args, start=self.start))
        seed = self.order_args[1]
        rows = pack_examples(self.sizes, task_order(*self.order_args), self.seq_len, self.buffer_size, seed)
        return itertools.islice(rows, self.start, None)
