"""Packing documents into fixed-length windows (docs/reference.md, section 3), as pure functions.

A document of n tokens is framed as `[BOS] + tokens + [EOS]`. Call `tokens + [EOS]` its *body*
(n + 1 tokens). Packing cuts each body into consecutive slices and puts every slice, behind a BOS
of its own, into a window of `seq_len` tokens; such a `[BOS] + slice` is a *piece*. So every body
token appears exactly once and in order, and every piece starts with BOS (its anchor, for
AnchorAttention). Whatever a window has left over is one trailing pseudo-document of `pad_id`.

Two strategies:

- `chunk` fills every window to the brim and splits documents across windows (the usual
  concatenate-and-chunk of pretraining). Only the last window of the stream is padded, plus a
  single pad slot when a window has room for a BOS and nothing after it (a piece holding only
  BOS would teach nothing and waste a slot in the next window too).
- `bfd`, best-fit decreasing over a bounded buffer of documents: a document is split only when
  it does not fit in a window at all ("Fewer Truncations Improve Language Modeling", Ding et al.
  2024, arXiv 2404.10830, shows that avoiding truncation helps). Within each buffer, pieces are
  placed longest first into the open window with the least room that still fits them.

Planning works on lengths alone (`plan_windows`), so the DataModule can find where window k
starts, or skip to it on resume, without reading any token; `pack_documents` runs the plan on
token lists.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from longcpt.batch import IGNORE_INDEX
from longcpt.errors import LongcptError

PACKING_STRATEGIES = ("chunk", "bfd")
DEFAULT_BFD_BUFFER = 1024  # documents sorted and placed together by `bfd`


class Piece(NamedTuple):
    """`[BOS] + body[lo:hi]` of document `doc`, where body = its tokens + [EOS]."""

    doc: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        """Tokens the piece takes in a window, its BOS included."""
        return 1 + self.hi - self.lo


def _check(seq_len: int, strategy: str, buffer_size: int) -> None:
    if strategy not in PACKING_STRATEGIES:
        raise LongcptError(f"packing strategy {strategy!r}: must be one of {', '.join(PACKING_STRATEGIES)} "
                           "(data.packing in the recipe)")
    if seq_len < 2:
        raise LongcptError(f"seq_len={seq_len}: must be >= 2 (a window needs room for BOS and one token)")
    if buffer_size < 1:
        raise LongcptError(f"bfd buffer size {buffer_size}: must be >= 1 document (data.bfd_buffer)")


def plan_windows(
    lengths: Iterable[int], seq_len: int, strategy: str = "chunk", buffer_size: int = DEFAULT_BFD_BUFFER
) -> Iterator[list[Piece]]:
    """Decide which pieces of which documents fill each window, from document lengths alone.

    Args:
        lengths: token count of each document (without BOS/EOS), in stream order; read lazily.
        seq_len: window length in tokens.
        strategy: `chunk` or `bfd` (see the module docstring).
        buffer_size: documents placed together by `bfd` (ignored by `chunk`).

    Returns:
        An iterator of windows, each a list of `Piece`s (document index = position in `lengths`)
        whose sizes sum to at most `seq_len`; the rest of the window is padding.

    Raises:
        LongcptError: unknown strategy, seq_len < 2 or buffer_size < 1.
    """
    _check(seq_len, strategy, buffer_size)
    if strategy == "chunk":
        return _plan_chunk(lengths, seq_len)
    return _plan_bfd(lengths, seq_len, buffer_size)


def _plan_chunk(lengths: Iterable[int], seq_len: int) -> Iterator[list[Piece]]:
    window: list[Piece] = []
    free = seq_len
    for doc, n in enumerate(lengths):
        body, lo = int(n) + 1, 0
        while lo < body:
            if free < 2:  # room for a BOS only: pad that slot, continue in a fresh window
                yield window
                window, free = [], seq_len
            take = min(free - 1, body - lo)
            window.append(Piece(doc, lo, lo + take))
            free -= take + 1
            lo += take
            if free == 0:
                yield window
                window, free = [], seq_len
    if window:
        yield window


def _plan_bfd(lengths: Iterable[int], seq_len: int, buffer_size: int) -> Iterator[list[Piece]]:
    buffer: list[tuple[int, int]] = []
    for doc, n in enumerate(lengths):
        buffer.append((doc, int(n)))
        if len(buffer) == buffer_size:
            yield from _best_fit_decreasing(buffer, seq_len)
            buffer = []
    if buffer:
        yield from _best_fit_decreasing(buffer, seq_len)


def _best_fit_decreasing(docs: list[tuple[int, int]], seq_len: int) -> Iterator[list[Piece]]:
    """Pack one buffer. Documents too long for a window first give up full windows of their head,
    emitted at once (so a document's pieces stay in order); their tail is packed like the rest."""
    pieces: list[Piece] = []
    for doc, n in docs:
        body, lo = n + 1, 0
        while 1 + body - lo > seq_len:
            yield [Piece(doc, lo, lo + seq_len - 1)]
            lo += seq_len - 1
        pieces.append(Piece(doc, lo, body))
    for window in best_fit_decreasing([p.size for p in pieces], seq_len):
        yield [pieces[i] for i in window]


def best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of at most `capacity` for items of `sizes` (each <= capacity), by best-fit decreasing.

    Items are placed longest first (ties in input order) into the open bin with the least room
    that still fits them. Returns the bins in order of opening, each a list of item indices in
    the order they were placed; deterministic.

    Example::

        >>> best_fit_decreasing([3, 5, 2, 4], 8)
        [[1, 0], [3, 2]]
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])  # stable: equal sizes keep input order
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free slots, bin index) of the open bins
    for i in order:
        size = sizes[i]
        j = bisect.bisect_left(room, (size, -1))  # the tightest bin that still fits
        if j == len(room):
            bins.append([i])
            free, b = capacity - size, len(bins) - 1
        else:
            free, b = room.pop(j)
            bins[b].append(i)
            free -= size
        if free > 0:
            bisect.insort(room, (free, b))
    return bins


def materialize_window(
    pieces: Sequence[Piece],
    tokens_of: Callable[[int], Sequence[int] | np.ndarray],
    seq_len: int,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
) -> dict:
    """Build one window's tokens, labels and document lengths from its plan.

    Args:
        pieces: the window's plan (from `plan_windows`).
        tokens_of: document index -> its tokens (without BOS/EOS).
        seq_len: window length.
        bos_id, eos_id, pad_id: special token ids.

    Returns:
        `{"input_ids": int64 (seq_len,), "labels": int64 (seq_len,), "doc_lens": list[int]}` as
        `pack_documents` describes.
    """
    ids = np.empty(seq_len, dtype=np.int64)
    doc_lens = []
    pos = 0
    for p in pieces:
        tokens = tokens_of(p.doc)
        n = len(tokens)
        ids[pos] = bos_id
        stop = min(p.hi, n)
        k = max(stop - p.lo, 0)
        ids[pos + 1 : pos + 1 + k] = tokens[p.lo : stop]
        if p.hi > n:  # the body's last token is the EOS
            ids[pos + 1 + k] = eos_id
        pos += p.size
        doc_lens.append(p.size)
    if pos < seq_len:
        ids[pos:] = pad_id
        doc_lens.append(seq_len - pos)
    return {"input_ids": ids, "labels": labels_for(ids, doc_lens, n_pad=seq_len - pos), "doc_lens": doc_lens}


def labels_for(input_ids: np.ndarray, doc_lens: Sequence[int], n_pad: int = 0) -> np.ndarray:
    """`labels[t] = input_ids[t+1]` inside a document piece, -100 at its last token and on padding.

    Labels are already aligned (labels[t] is the target of token t): no shift in the trainer.
    """
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = input_ids[1:]
    labels[np.cumsum(doc_lens) - 1] = IGNORE_INDEX  # nothing after a piece's last token
    if n_pad:
        labels[len(input_ids) - n_pad :] = IGNORE_INDEX
    return labels


def pack_documents(
    docs: Iterable[Sequence[int] | np.ndarray],
    seq_len: int,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    strategy: str = "chunk",
    buffer_size: int = DEFAULT_BFD_BUFFER,
) -> Iterator[dict]:
    """Pack token lists into windows of `seq_len` tokens (docs/reference.md, section 3).

    A document becomes `[BOS] + tokens + [EOS]`; a piece of a split document starts with BOS too.
    Every token of every document appears exactly once, in order; `sum(doc_lens) == seq_len`;
    trailing padding (if any) is one last pseudo-document of `pad_id`. `labels[t] =
    input_ids[t+1]` when both lie in the same document piece, else -100 (pads too).

    Example (BOS=1, EOS=2, PAD=0)::

        >>> windows = pack_documents([[5, 6, 7], [8, 9]], 4, bos_id=1, eos_id=2, pad_id=0)
        >>> [(w["input_ids"].tolist(), w["labels"].tolist(), w["doc_lens"]) for w in windows]
        [([1, 5, 6, 7], [5, 6, 7, -100], [4]),
         ([1, 2, 1, 8], [2, -100, 8, -100], [2, 2]),
         ([1, 9, 2, 0], [9, 2, -100, -100], [3, 1])]
        >>> windows = pack_documents([[5, 6, 7], [8, 9]], 6, bos_id=1, eos_id=2, pad_id=0, strategy="bfd")
        >>> [(w["input_ids"].tolist(), w["doc_lens"]) for w in windows]
        [([1, 5, 6, 7, 2, 0], [5, 1]), ([1, 8, 9, 2, 0, 0], [4, 2])]

    Args:
        docs: token sequences (lists or arrays, no BOS/EOS), consumed lazily.
        seq_len: window length.
        bos_id, eos_id, pad_id: special token ids.
        strategy: `chunk` (split to fill every window) or `bfd` (best-fit decreasing over
            `buffer_size` documents; split only documents longer than a window).
        buffer_size: documents buffered by `bfd`; memory stays bounded by it.

    Returns:
        An iterator of `{"input_ids": int64 array (seq_len,), "labels": int64 array (seq_len,),
        "doc_lens": list[int]}`.

    Raises:
        LongcptError: unknown strategy, seq_len < 2, buffer_size < 1.
    """
    _check(seq_len, strategy, buffer_size)
    held: dict[int, np.ndarray] = {}  # documents read but not fully emitted yet

    def lengths() -> Iterator[int]:
        for i, d in enumerate(docs):
            held[i] = np.asarray(d, dtype=np.int64)
            yield len(held[i])

    for pieces in plan_windows(lengths(), seq_len, strategy, buffer_size):
        yield materialize_window(pieces, held.__getitem__, seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
        for p in pieces:
            if p.hi == len(held[p.doc]) + 1:  # its last piece is out
                del held[p.doc]
