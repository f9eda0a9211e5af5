"""The packed-batch contract: cu_seqlens checks and the three position rules, on literal examples."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcpt.batch import cu_seqlens_for, document_spans, position_ids
from longcpt.errors import LongcptError

ROW = [3, 2, 3]  # one row: documents of 3 and 2 tokens (BOS included), then 3 pad slots


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("arange", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("document", [0, 1, 2, 0, 1, 0, 1, 2]),
        ("anchor", [0, 1, 2, 0, 4, 0, 6, 7]),  # arange, each document's BOS at 0
    ],
)
def test_position_rules_literal(rule, expected):
    pos = position_ids(rule, cu_seqlens_for([ROW]), 1, 8)
    assert pos.dtype == torch.int64 and pos.tolist() == [expected]


def test_without_cu_seqlens_every_rule_is_arange_per_row():
    for rule in ("arange", "document", "anchor"):
        assert position_ids(rule, None, 2, 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="unknown position rule"):
        position_ids("reset", None, 1, 3)


def test_cu_seqlens_literal_over_flattened_rows():
    cu = cu_seqlens_for([[3, 2, 3], [8], [1, 7]])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 8, 16, 17, 24]
    assert document_spans(cu, 3, 8) == [(0, 3), (3, 2), (5, 3), (8, 8), (16, 1), (17, 7)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6), min_size=1, max_size=3))
def test_anchor_and_document_positions_follow_the_formula(rows):
    # Document k at row offset s_k: [0, s_k+1, ..., s_k+len_k-1] (anchor), arange(len_k) (document).
    t = max(sum(row) for row in rows)
    rows = [row + ([t - sum(row)] if sum(row) < t else []) for row in rows]  # pad rows to T
    cu = cu_seqlens_for(rows)
    anchor, document = position_ids("anchor", cu, len(rows), t), position_ids("document", cu, len(rows), t)
    for r, row in enumerate(rows):
        s = 0
        for n in row:
            assert anchor[r, s : s + n].tolist() == [0] + list(range(s + 1, s + n))
            assert document[r, s : s + n].tolist() == list(range(n))
            s += n


@pytest.mark.parametrize(
    "cu, problem",
    [
        ([0, 3, 8], "must start at 0 and end at B*T=16"),
        ([1, 8, 16], "must start at 0"),
        ([0, 3, 3, 8, 16], "no empty documents"),
        ([0, 5, 10, 16], "row starts [8] are not document starts"),
    ],
)
def test_bad_cu_seqlens_are_named(cu, problem):
    with pytest.raises(LongcptError) as err:
        document_spans(torch.tensor(cu, dtype=torch.int32), 2, 8)
    assert problem in str(err.value) and f"cu_seqlens={cu}" in str(err.value)
    with pytest.raises(LongcptError, match="1-D integer tensor"):
        document_spans(torch.tensor([0.0, 16.0]), 2, 8)
