"""The packed-batch contract: the one module that says what a batch means.

Every consumer of packed data (the collator, the model's attention kinds, the training loop, the
evaluations) calls these functions instead of re-deriving the rules. A batch is

    {"input_ids": (B, T) int64, "labels": (B, T) int64, "position_ids": (B, T) int64,
     "cu_seqlens": (N+1,) int32}

* `labels[t]` is the target of token t, already aligned (no shift in the trainer), and
  `IGNORE_INDEX` (-100) where nothing is predicted: the last token of every document piece and
  the padding.
* `cu_seqlens` holds the document starts over the flattened B*T tokens, then B*T: it starts at 0,
  strictly increases (no empty document) and every row start is a document start (documents never
  cross rows). The padding at the end of a row is one last pseudo-document.
* `position_ids` follow one of three rules, which every attention kind declares
  (`longcpt.model.attention`). For a row of documents with lengths [3, 2, 3] (T = 8):

      tokens      B a b | B c | B d e        (B = each piece's BOS)
      arange      0 1 2   3 4   5 6 7        full: one sequence per row
      document    0 1 2   0 1   0 1 2        intra_doc, infini: restart in every document
      anchor      0 1 2   0 4   0 6 7        anchor: arange, each document's BOS at 0 (its anchor)

  The anchor rule is AnchorAttention's (arXiv 2411.13476): positions are not reset, only each
  document's BOS goes to 0, so every token's distance to its anchor is its index in the row, as
  with one shared anchor at the window start. The full write-up is docs/reference.md.

Shapes: B batch, T tokens per row, N documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from longcpt.errors import LongcptError

IGNORE_INDEX = -100  # label of a token that predicts nothing (cross-entropy's ignore_index)
POSITION_RULES = ("arange", "document", "anchor")


class Span(NamedTuple):
    """One document of a packed batch: its first token's flat index over B*T and its length."""

    start: int
    length: int


def cu_seqlens_for(doc_lens_per_row: Sequence[Sequence[int]]) -> torch.Tensor:
    """`cu_seqlens` (N+1,) int32 for rows whose documents have the given lengths.

    Example: [[3, 2, 3], [8]] -> [0, 3, 5, 8, 16].
    """
    lengths = torch.tensor([n for row in doc_lens_per_row for n in row], dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)


def document_spans(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[Span]:
    """Check `cu_seqlens` against the contract and list the documents.

    Args:
        cu_seqlens: (N+1,) document starts over the flattened B*T tokens, or None for one document
            per row.
        batch, seq_len: B and T.

    Returns:
        The N spans in order (one host sync to read `cu_seqlens`).

    Raises:
        LongcptError: not a 1-D integer tensor, not from 0 to B*T, not strictly increasing (an
            empty document), or a document crossing a row boundary.
    """
    total = batch * seq_len
    if cu_seqlens is None:
        return [Span(row * seq_len, seq_len) for row in range(batch)]
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise LongcptError(
            f"cu_seqlens must be a 1-D integer tensor of document starts, got shape "
            f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    bounds = [int(x) for x in cu_seqlens.tolist()]
    problem = _boundary_problem(bounds, batch, seq_len)
    if problem:
        raise LongcptError(
            f"cu_seqlens={_short(bounds)} for a batch of {batch} x {seq_len} tokens: {problem} "
            f"(document starts over the flattened B*T tokens, from 0 to {total}, with every row start "
            "among them; build it with longcpt.batch.cu_seqlens_for or the collator of longcpt.data)"
        )
    return [Span(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _boundary_problem(bounds: list[int], batch: int, seq_len: int) -> str:
    total = batch * seq_len
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        return f"must start at 0 and end at B*T={total}"
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        return "must be strictly increasing (no empty documents)"
    missing = sorted(set(range(0, total, seq_len)) - set(bounds))
    if missing:
        return f"documents cross row boundaries (row starts {_short(missing)} are not document starts)"
    return ""


def _short(values: list[int], n: int = 8) -> str:
    return str(values) if len(values) <= n else f"[{', '.join(map(str, values[:n]))}, ... ({len(values)} values)]"


def position_ids(rule: str, cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor:
    """(B, T) int64 RoPE positions of a packed batch under `rule` (see the module docstring).

    Args:
        rule: one of `POSITION_RULES` (an attention kind's `positions`).
        cu_seqlens: (N+1,) document starts, or None for one document per row (every rule then
            gives `arange(T)` per row).
        batch, seq_len: B and T.

    Raises:
        ValueError: unknown rule.
    """
    if rule not in POSITION_RULES:
        raise ValueError(f"unknown position rule {rule!r}; known: {', '.join(POSITION_RULES)}")
    device = cu_seqlens.device if cu_seqlens is not None else None
    flat = torch.arange(batch * seq_len, device=device)
    if cu_seqlens is None or rule == "arange":
        return (flat % seq_len).view(batch, seq_len)
    cu = cu_seqlens.long()
    if rule == "document":
        doc_start = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=batch * seq_len)  # (B*T,)
        return (flat - doc_start).view(batch, seq_len)
    is_start = torch.zeros(batch * seq_len, dtype=torch.bool, device=device)
    is_start[cu[:-1]] = True
    return (flat % seq_len).masked_fill(is_start, 0).view(batch, seq_len)
