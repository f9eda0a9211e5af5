"""Collator: position ids per attention kind and cu_seqlens (docs/reference.md, section 3) on literal examples."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longcpt.data.collate import Collator
from longcpt.data.packing import pack_documents
from longcpt.errors import LongcptError


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("full", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("intra_doc", [0, 1, 2, 0, 1, 0, 1, 2]),
        ("anchor", [0, 1, 2, 0, 4, 0, 6, 7]),  # arange, each document's BOS at 0
        ("infini", [0, 1, 2, 0, 1, 0, 1, 2]),
    ],
)
def test_collator_applies_each_kinds_position_rule(kind, expected):
    # One row: documents of 3 and 2 tokens (BOS included), then 3 pad slots (a pseudo-document).
    window = {"input_ids": list(range(8)), "labels": list(range(8)), "doc_lens": [3, 2, 3]}
    batch = Collator(kind)([window])
    assert batch["position_ids"].dtype == torch.int64 and batch["position_ids"].tolist() == [expected]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 8]


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(LongcptError, match="'ancor' is unknown; known kinds: .*anchor"):
        Collator("ancor")


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
    batch = Collator("intra_doc")(windows)
    assert batch["input_ids"].tolist() == [w["input_ids"].tolist() for w in windows]
    assert batch["labels"].tolist() == [w["labels"].tolist() for w in windows]
    assert batch["labels"][0].tolist() == [5, 6, 7, 2, -100, -100]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]]


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
    batch = Collator("full")([window])
    with torch.no_grad():
        out = model(batch["input_ids"], labels=batch["input_ids"])
        ours = F.cross_entropy(out.logits.view(-1, 64), batch["labels"].view(-1), ignore_index=-100)
    torch.testing.assert_close(ours, out.loss)
