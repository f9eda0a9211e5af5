"""The leak probe (`longcpt.doctor.leak`) on a tiny model in this process: it passes the real
kernels of every trainable kind bit-exactly on the CPU, and fails a mask that leaks across
documents and one that hides a document's first token (each put in place of the CPU document
kernel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcpt.doctor.kernels import tiny_args
from longcpt.doctor.leak import leak_probe, probe_window
from longcpt.model import CausalLM
from longcpt.model.attention import document


def probe(kind: str, across: bool = False, **options):
    torch.manual_seed(0)
    model = CausalLM(tiny_args(kind, **options)).eval()
    batch = probe_window(kind, model.args.vocab_size, torch.device("cpu"))

    def forward(b):
        return model(b["input_ids"], position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"])

    return leak_probe(forward, batch, model.args.vocab_size, across_documents=across)


@pytest.mark.parametrize("kind, across, options", [
    ("anchor", False, {}), ("intra_doc", False, {}), ("full", True, {}),
    ("infini", False, {"segment_len": 8}),  # documents of 17-34 tokens cross segments: the memory carries them
    ("s2", False, {}),
])
def test_the_real_kernels_pass_exactly(kind, across, options):
    report = probe(kind, across, **options)
    assert report.ok, report.problems()
    assert report.stayed == report.anchor_stayed == 0.0 and report.moved > 1e-4 and report.anchor_moved > 1e-4


def leaking(q, k, v, cu_seqlens):
    """Causal over the whole row: documents see each other."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def hiding_the_anchor(q, k, v, cu_seqlens):
    """Document-causal, but no token sees its document's first token (except that token itself)."""
    b, _, t, _ = q.shape
    starts = cu_seqlens[:-1].long()
    doc = (torch.zeros(b * t, dtype=torch.long).index_fill_(0, starts, 1).cumsum(0)).view(b, t)  # (B, T)
    first = torch.zeros(b * t, dtype=torch.bool).index_fill_(0, starts, True).view(b, t)
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    mask &= ~first[:, None, :] | torch.eye(t, dtype=torch.bool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


@pytest.mark.parametrize("kernel, words", [(leaking, "leaks across documents"), (hiding_the_anchor, "hides the anchor")])
def test_a_wrong_mask_fails(monkeypatch, kernel, words):
    monkeypatch.setattr(document, "cpu_document_attention", kernel)  # the CPU path of intra_doc and anchor
    report = probe("anchor")
    assert not report.ok and any(words in p for p in report.problems())
