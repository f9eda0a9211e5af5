"""Fine-tuning on prompt -> answer tasks (passkey, BookSum): answer-only labels and batches.

A task example is a prompt and a target (the answer or summary, ending with EOS). One example
fills one row of `seq_len` tokens, right-padded:

    tokens    BOS  p1  p2  p3  a1  a2  EOS  PAD PAD
    labels    -100 -100 -100 a1 a2 EOS -100 -100 -100     labels[t] = target of token t
    doc_lens  [7, 2]                                      the padding is one last pseudo-document

so the loss falls on the target only (the model is not trained to reproduce the filler or the
book). Position ids and `cu_seqlens` follow SPEC section 6; with one document per row plus
trailing padding they are `arange(T)` for every attention kind except `intra_doc`, whose
positions restart in the padding pseudo-document (which carries no label), and nothing in the
padding can reach the example because attention is causal.

The concrete tasks (`data/passkey.py`, `data/booksum.py`) turn their files into (prompt, target)
pairs and use `TaskDataModule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from longcpt.errors import LongcptError

IGNORE_INDEX = -100


def answer_only_row(prompt_ids: Sequence[int], target_ids: Sequence[int], seq_len: int, pad_id: int) -> dict:
    """One right-padded row with labels on `target_ids` only.

    Args:
        prompt_ids: the prompt (BOS first when the tokenizer has one).
        target_ids: what the model must produce after the prompt (EOS included by the caller).
        seq_len: row length.
        pad_id: padding token.

    Returns:
        {"input_ids": list, "labels": list, "doc_lens": list} of `seq_len` tokens.

    Raises:
        ValueError: prompt + target longer than `seq_len` (callers truncate first), or empty.
    """
    tokens = list(prompt_ids) + list(target_ids)
    n, p = len(tokens), len(prompt_ids)
    if n > seq_len or p == 0 or not target_ids:
        raise ValueError(f"prompt {p} + target {len(target_ids)} tokens: need both non-empty and <= {seq_len}")
    # labels[t] = tokens[t+1] for the positions whose next token is part of the target.
    labels = [IGNORE_INDEX] * (p - 1) + tokens[p:] + [IGNORE_INDEX] * (seq_len - n + 1)
    return {
        "input_ids": tokens + [pad_id] * (seq_len - n),
        "labels": labels,
        "doc_lens": [n] + ([seq_len - n] if n < seq_len else []),
    }


def row_positions(doc_lens: Sequence[int], kind: str) -> torch.Tensor:
    """Position ids (T,) of one row per SPEC section 6, for rows whose first document is the example.

    `intra_doc` restarts at 0 in every document; the others use `arange(T)` (for `anchor` the
    example's BOS is at position 0 already).
    """
    if kind == "intra_doc":
        return torch.cat([torch.arange(n) for n in doc_lens])
    return torch.arange(sum(doc_lens))


def collate_task_rows(rows: Sequence[dict], kind: str) -> dict[str, torch.Tensor]:
    """Stack rows of `answer_only_row` into a batch with position ids and `cu_seqlens`.

    Returns:
        {"input_ids", "labels", "position_ids"} as (B, T) int64 and "cu_seqlens" (N+1,) int32
        over the flattened B*T tokens.
    """
    t = len(rows[0]["input_ids"])
    starts = [0]
    for i, row in enumerate(rows):
        for n in row["doc_lens"]:
            starts.append(starts[-1] + n)
        assert starts[-1] == (i + 1) * t, "doc_lens must sum to the row length"
    return {
        "input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long),
        "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
        "position_ids": torch.stack([row_positions(r["doc_lens"], kind) for r in rows]),
        "cu_seqlens": torch.tensor(starts, dtype=torch.int32),
    }


class TaskDataset(Dataset):
    """(prompt, target) pairs made into answer-only rows on access."""

    def __init__(self, pairs: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
        self.pairs, self.seq_len, self.pad_id = pairs, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        prompt, target = self.pairs[i]
        return answer_only_row(prompt, target, self.seq_len, self.pad_id)


class _Collate:
    """Picklable collate function (DataLoader workers pickle it)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate_task_rows(rows, self.kind)


class TaskDataModule(pl.LightningDataModule):
    """DataModule over (prompt, target) pairs read by `load_pairs(path)` for train and val.

    Args:
        cfg: the recipe (`longcpt.config.Config`); uses data.train/val/seq_len/micro_batch_size/
            num_workers, attention.kind and trainer.seed.
        tokenizer: a transformers tokenizer (its pad id pads rows; EOS id when pad is unset).
        load_pairs: `load_pairs(path, seq_len)` reads a data path into a list of
            (prompt_ids, target_ids) that fit `seq_len` (truncating or failing as the task decides).

    The training order is a seeded shuffle per epoch; under DDP Lightning swaps in its
    DistributedSampler (also seeded), so every rank reads a disjoint part.
    """

    def __init__(self, cfg, tokenizer, load_pairs: Callable[[str, int], list[tuple[list[int], list[int]]]]):
        super().__init__()
        self.cfg, self.tokenizer, self.load_pairs = cfg, tokenizer, load_pairs
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise LongcptError("tokenizer has neither a pad nor an EOS token; task fine-tuning needs one to pad rows")
        self.pad_id = pad
        self.train_set: TaskDataset | None = None
        self.val_set: TaskDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        d = self.cfg.data
        if self.train_set is None:
            self.train_set = TaskDataset(self.load_pairs(d.train, d.seq_len), d.seq_len, self.pad_id)
        if self.val_set is None and d.val:
            self.val_set = TaskDataset(self.load_pairs(d.val, d.seq_len), d.seq_len, self.pad_id)

    def _loader(self, dataset: TaskDataset, shuffle: bool) -> DataLoader:
        d = self.cfg.data
        return DataLoader(
            dataset,
            batch_size=d.micro_batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.cfg.trainer.seed) if shuffle else None,
            collate_fn=_Collate(self.cfg.attention.kind),
            num_workers=d.num_workers,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("fit")
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
