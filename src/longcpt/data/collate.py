"""Packed windows -> the batch every model consumer uses (SPEC section 6), as pure functions.

    {"input_ids": (B, T) int64, "labels": (B, T) int64 (-100 ignored),
     "position_ids": (B, T) int64, "cu_seqlens": (N+1,) int32}

which is what `CausalLM.loss(input_ids, labels, position_ids, cu_seqlens)` takes. Labels are
already aligned (labels[t] is the target of token t), so the trainer does no shifting.

Position ids by attention kind, for a row of documents with lengths [3, 2, 3] (T = 8):

    tokens        B a b | B c | B d e        (B = each piece's BOS)
    full          0 1 2   3 4   5 6 7        arange(T); no document mask
    intra_doc     0 1 2   0 1   0 1 2        restart in every document
    anchor        0 1 2   0 4   0 6 7        arange(T), each document's BOS at 0 (its anchor)
    infini        0 1 2   0 1   0 1 2        as intra_doc: memory resets at document starts

`cu_seqlens` is the same for every kind: the document starts over the flattened B*T tokens plus
B*T, e.g. [0, 3, 5, 8] for the row above. A kind that attends across documents (`full`) simply
ignores it. The padding pseudo-document counts as a document, so nothing attends to or from it
across a boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

KINDS = ("full", "intra_doc", "anchor", "infini")


def position_ids_for(doc_lens: Sequence[int], kind: str) -> torch.Tensor:
    """Position ids (T,) int64 of one packed row for attention `kind` (see the module table).

    Args:
        doc_lens: lengths of the row's documents (the padding pseudo-document included).
        kind: full | intra_doc | anchor | infini.

    Returns:
        (T,) int64 with T = sum(doc_lens).

    Raises:
        ValueError: unknown kind.
    """
    lens = np.asarray(doc_lens, dtype=np.int64)
    t = int(lens.sum())
    starts = np.cumsum(lens) - lens  # (N,) start of each document in the row
    if kind == "full":
        pos = np.arange(t)
    elif kind in ("intra_doc", "infini"):
        pos = np.arange(t) - np.repeat(starts, lens)
    elif kind == "anchor":
        # AnchorAttention (arXiv 2411.13476; haonan3/AnchorContext train.py): positions are not
        # reset, only each document's BOS goes to 0, so its distance to every token of its
        # document is that token's absolute index, as with one shared anchor at the window start.
        pos = np.arange(t)
        pos[starts] = 0
    else:
        raise ValueError(f"unknown attention kind {kind!r}; known: {', '.join(KINDS)}")
    return torch.from_numpy(pos.astype(np.int64))


def cu_seqlens_for(doc_lens_per_row: Sequence[Sequence[int]]) -> torch.Tensor:
    """Cumulative document starts (N+1,) int32 over the flattened (B*T) tokens.

    Args:
        doc_lens_per_row: for each row, its documents' lengths (each row sums to T).

    Returns:
        int32 tensor `[0, s_1, ..., B*T]`; documents never cross rows.
    """
    lens = [n for row in doc_lens_per_row for n in row]
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    return torch.from_numpy(cu.astype(np.int32))


def collate_windows(windows: Sequence[dict], kind: str) -> dict[str, torch.Tensor]:
    """Stack windows from `pack_documents` into one batch for attention `kind`.

    Args:
        windows: dicts with `input_ids`, `labels` (arrays of equal length T) and `doc_lens`.
        kind: the attention kind the positions are made for.

    Returns:
        `{"input_ids", "labels", "position_ids"}` (B, T) int64 and `"cu_seqlens"` (N+1,) int32.
    """
    return {
        "input_ids": torch.from_numpy(np.stack([np.asarray(w["input_ids"], dtype=np.int64) for w in windows])),
        "labels": torch.from_numpy(np.stack([np.asarray(w["labels"], dtype=np.int64) for w in windows])),
        "position_ids": torch.stack([position_ids_for(w["doc_lens"], kind) for w in windows]),
        "cu_seqlens": cu_seqlens_for([w["doc_lens"] for w in windows]),
    }


class Collator:
    """`collate_windows` bound to an attention kind: a picklable `collate_fn` for DataLoaders."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; known: {', '.join(KINDS)}")
        self.kind = kind

    def __call__(self, windows: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate_windows(windows, self.kind)
