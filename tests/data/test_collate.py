"""Collator: position ids per attention kind and cu_seqlens (SPEC section 6) on literal examples."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longcpt.data.collate import Collator, collate_windows, cu_seqlens_for, position_ids_for
from longcpt.data.packing import pack_documents

# One row: documents of 3 and 2 tokens (BOS included), then 3 pad slots (a pseudo-document).
ROW = [3, 2, 3]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("full", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("intra_doc", [0, 1, 2, 0, 1, 0, 1, 2]),
        ("anchor", [0, 1, 2, 0, 4, 0, 6, 7]),  # arange, each document's BOS at 0
        ("infini", [0, 1, 2, 0, 1, 0, 1, 2]),
    ],
)
def test_position_ids_literal(kind, expected):
    pos = position_ids_for(ROW, kind)
    assert pos.dtype == torch.int64 and pos.tolist() == expected


def test_cu_seqlens_literal_over_flattened_rows():
    cu = cu_seqlens_for([[3, 2, 3], [8], [1, 7]])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 8, 16, 17, 24]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8))
def test_anchor_and_intra_doc_positions_follow_the_spec_formula(doc_lens):
    # SPEC 6: document k at offset s_k gets [0, s_k+1, ..., s_k+len_k-1] (anchor), arange(len_k) (intra_doc)
    anchor, intra = position_ids_for(doc_lens, "anchor").tolist(), position_ids_for(doc_lens, "intra_doc").tolist()
    s = 0
    for n in doc_lens:
        assert anchor[s : s + n] == [0] + list(range(s + 1, s + n))
        assert intra[s : s + n] == list(range(n))
        s += n


def test_collated_batch_keys_shapes_and_dtypes():
    windows = list(pack_documents([[5, 6, 7], [8, 9], [10] * 9], 6, bos_id=1, eos_id=2, pad_id=0))
    batch = Collator("anchor")(windows[:2])
    assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seqlens"}
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (2, 6) and batch[key].dtype == torch.int64
    assert batch["cu_seqlens"].dtype == torch.int32
    # a slot with room for a BOS only is padded: [1 5 6 7 2|0] [1 8 9 2|1 10]
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 1, 10]]
    assert batch["cu_seqlens"].tolist() == [0, 5, 6, 10, 12]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 5]]


def test_collated_windows_are_exactly_the_packed_ones():
    docs = [[5, 6, 7], [8, 9], [10] * 9]
    windows = list(pack_documents(docs, 6, bos_id=1, eos_id=2, pad_id=0))
    batch = collate_windows(windows, "intra_doc")
    assert batch["input_ids"].tolist() == [w["input_ids"].tolist() for w in windows]
    assert batch["labels"].tolist() == [w["labels"].tolist() for w in windows]
    assert batch["labels"][0].tolist() == [5, 6, 7, 2, -100, -100]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]]


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="sliding"):
        Collator("sliding")


def test_aligned_labels_give_transformers_causal_lm_loss():
    """labels[t] is the target of token t: with them, plain cross-entropy on the logits equals
    the loss transformers computes from `labels=input_ids` (it shifts internally)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    doc = np.random.default_rng(0).integers(3, 64, size=14).tolist()  # 1 + 14 + 1 = 16 tokens: one full window
    (window,) = pack_documents([doc], 16, bos_id=1, eos_id=2, pad_id=0)
    batch = collate_windows([window], "full")
    with torch.no_grad():
        out = model(batch["input_ids"], labels=batch["input_ids"])
        ours = F.cross_entropy(out.logits.view(-1, 64), batch["labels"].view(-1), ignore_index=-100)
    torch.testing.assert_close(ours, out.loss)
