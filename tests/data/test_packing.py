"""pack_documents: every invariant of docs/reference.md section 3, as properties over random documents."""

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcpt.data import packing
from longcpt.data.packing import IGNORE_INDEX, pack_documents, plan_windows
from longcpt.errors import LongcptError

BOS, EOS, PAD = 1, 2, 0
# Document tokens avoid the special ids, so a test can tell every token's origin.
token = st.integers(min_value=3, max_value=50)
documents = st.lists(st.lists(token, max_size=40), max_size=25)
seq_lens = st.integers(min_value=2, max_value=48)
strategies = st.sampled_from(["chunk", "bfd"])
buffers = st.integers(min_value=1, max_value=8)
SETTINGS = settings(max_examples=150, deadline=None)


def pack(docs, seq_len, strategy, buffer_size=4):
    return list(pack_documents(docs, seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD, strategy=strategy,
                               buffer_size=buffer_size))


def pieces_of(window):
    """Split a window by its doc_lens into (tokens, labels) per piece, padding excluded."""
    out, start = [], 0
    ids, labels = window["input_ids"].tolist(), window["labels"].tolist()
    for n in window["doc_lens"]:
        out.append((ids[start : start + n], labels[start : start + n]))
        start += n
    if out and all(t == PAD for t in out[-1][0]):
        out.pop()
    return out


def reassemble(windows):
    """Rebuild every document body (tokens + EOS) from the pieces, in emission order.

    A piece continues the previous unfinished document when one is open (its body has no EOS
    yet), else starts a new one. With `chunk` this follows the stream; for `bfd` the test uses
    unique token values so each piece can be matched to its document instead.
    """
    bodies, open_body = [], None
    for w in windows:
        for tokens, _ in pieces_of(w):
            assert tokens[0] == BOS
            if open_body is None:
                open_body = []
                bodies.append(open_body)
            open_body += tokens[1:]
            if tokens[-1] == EOS:
                open_body = None
    return bodies


@SETTINGS
@given(documents, seq_lens, strategies, buffers)
def test_window_shape_doc_lens_and_labels(docs, seq_len, strategy, buffer_size):
    for w in pack(docs, seq_len, strategy, buffer_size):
        ids, labels, lens = w["input_ids"], w["labels"], w["doc_lens"]
        assert ids.shape == labels.shape == (seq_len,) and ids.dtype == labels.dtype == np.int64
        assert sum(lens) == seq_len and all(n >= 1 for n in lens)
        # labels[t] = ids[t+1] inside a piece, -100 at its last token and on padding
        start = 0
        for k, n in enumerate(lens):
            seg_ids, seg_labels = ids[start : start + n], labels[start : start + n]
            is_pad = (seg_ids == PAD).all()
            if is_pad:
                assert k == len(lens) - 1, "padding must be the last pseudo-document"
                assert (seg_labels == IGNORE_INDEX).all()
            else:
                assert seg_ids[0] == BOS and (seg_ids[1:] != BOS).all() and (seg_ids != PAD).all()
                assert seg_labels[:-1].tolist() == seg_ids[1:].tolist() and seg_labels[-1] == IGNORE_INDEX
            start += n


@SETTINGS
@given(documents, seq_lens)
def test_chunk_keeps_every_token_once_in_order_and_fills_windows(docs, seq_len):
    windows = pack(docs, seq_len, "chunk")
    assert reassemble(windows) == [d + [EOS] for d in docs]
    for w in windows[:-1]:  # only the last window, or a single slot with no room for BOS + token, pads
        pad = w["doc_lens"][-1] if (w["input_ids"][-1] == PAD) else 0
        assert pad <= 1


@SETTINGS
@given(st.lists(st.integers(min_value=0, max_value=40), max_size=25), seq_lens, buffers)
def test_bfd_keeps_every_token_once_and_splits_only_docs_longer_than_a_window(lengths, seq_len, buffer_size):
    # Unique token values: each piece is matched to its document by its first token.
    docs, nxt = [], 3
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    owner = {t: i for i, d in enumerate(docs) for t in d}
    bodies = {i: [] for i in range(len(docs))}
    pieces_per_doc = {i: 0 for i in range(len(docs))}
    for w in pack(docs, seq_len, "bfd", buffer_size):
        for tokens, _ in pieces_of(w):
            assert tokens[0] == BOS
            content = tokens[1:]
            real = [t for t in content if t != EOS]
            doc = owner[real[0]] if real else next(i for i, b in bodies.items() if len(b) == len(docs[i]))
            bodies[doc] += content
            pieces_per_doc[doc] += 1
    for i, d in enumerate(docs):
        assert bodies[i] == d + [EOS]  # every token exactly once, pieces in order
        if len(d) + 2 <= seq_len:
            assert pieces_per_doc[i] == 1, "a document that fits a window must not be split"


@SETTINGS
@given(documents, seq_lens, strategies, buffers)
def test_plan_matches_pack_and_uses_lengths_only(docs, seq_len, strategy, buffer_size):
    plans = list(plan_windows([len(d) for d in docs], seq_len, strategy, buffer_size))
    windows = pack(docs, seq_len, strategy, buffer_size)
    assert len(plans) == len(windows)
    for plan, w in zip(plans, windows):
        assert [p.size for p in plan] == w["doc_lens"][: len(plan)]


def test_docstring_example():
    failures, tried = doctest.testmod(packing, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 4 and failures == 0


def test_literal_chunk_example_splits_with_bos_on_every_piece():
    (w1, w2) = pack([[5, 6, 7, 8, 9]], 5, "chunk")
    assert w1["input_ids"].tolist() == [1, 5, 6, 7, 8] and w1["doc_lens"] == [5]
    assert w2["input_ids"].tolist() == [1, 9, 2, 0, 0] and w2["doc_lens"] == [3, 2]
    assert w2["labels"].tolist() == [9, 2, -100, -100, -100]


def test_bfd_places_pieces_longest_first_into_the_tightest_window():
    # sizes with BOS/EOS: 7, 5, 3, 2 into windows of 8: 7 -> A (1 left), 5 -> B (3 left),
    # 3 -> B (tightest fit, 0 left), 2 -> C.
    docs = [[10] * 5, [11] * 3, [12] * 1, [13] * 0]
    windows = pack(docs, 8, "bfd")
    assert [w["doc_lens"] for w in windows] == [[7, 1], [5, 3], [2, 6]]


def test_input_is_consumed_lazily():
    def endless():
        while True:
            yield [5, 6, 7]

    first = next(pack_documents(endless(), 8, bos_id=BOS, eos_id=EOS, pad_id=PAD))
    assert first["input_ids"].tolist() == [1, 5, 6, 7, 2, 1, 5, 6]


@pytest.mark.parametrize("kwargs, match", [({"strategy": "greedy"}, "greedy"), ({"seq_len": 1}, "seq_len=1"),
                                           ({"buffer_size": 0}, "buffer size 0")])
def test_bad_arguments_name_the_value(kwargs, match):
    args = {"seq_len": 8, "strategy": "chunk", "buffer_size": 4} | kwargs
    with pytest.raises(LongcptError, match=match):
        list(pack_documents([[5]], args["seq_len"], bos_id=1, eos_id=2, pad_id=0, strategy=args["strategy"],
                            buffer_size=args["buffer_size"]))
