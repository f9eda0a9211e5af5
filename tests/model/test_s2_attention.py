"""`s2` (LongLoRA's shifted sparse attention) against a reference written from the paper's rule.

The reference decides every (head, query, key) entry by the rule alone, in plain Python: a key is
visible when it is in the query's document, not after it, and in the same group, groups counted
from the document's start (offset by half a group for the last Hq - Hq // 2 heads when shifted).
Forward and backward are compared in float64 with packed rows holding 1-token documents,
documents that are not multiples of a group, GQA and odd group sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcpt.batch import Span, cu_seqlens_for
from longcpt.errors import LongcptError
from longcpt.model import CausalLM, ModelArgs
from longcpt.model.attention import AttentionContext, inference_kind, resolve_options
from longcpt.model.attention.s2 import S2Attention, group_bounds
from longcpt.model.attention.s2.plan import pairs as plan_pairs
from longcpt.model.attention.ulysses import SequenceParallel
from longcpt.model.rope import RotaryEmbedding

D = 8


def visible(doc_of: list[int], pos_in_doc: list[int], i: int, j: int, offset: int, g: int) -> bool:
    """The rule: same document, causal, same group (groups [0, G), [G, 2G), ... moved by `offset`,
    the first one `offset` tokens long)."""
    if doc_of[i] != doc_of[j] or j > i:
        return False
    group = [(p + g - offset) // g for p in (pos_in_doc[i], pos_in_doc[j])]
    return group[0] == group[1]


def reference_mask(rows: list[list[int]], heads: int, g: int, shift: bool) -> torch.Tensor:
    """(B, Hq, T, T) from the rule, entry by entry."""
    t = sum(rows[0])
    mask = torch.zeros(len(rows), heads, t, t, dtype=torch.bool)
    for b, lens in enumerate(rows):
        doc_of = [d for d, n in enumerate(lens) for _ in range(n)]
        pos = [p for n in lens for p in range(n)]
        for h in range(heads):
            offset = g // 2 if shift and h >= heads // 2 else 0
            for i in range(t):
                for j in range(t):
                    mask[b, h, i, j] = visible(doc_of, pos, i, j, offset, g)
    return mask


def identity_ctx(cu: torch.Tensor | None, batch: int, t: int, sequence_parallel=None) -> AttentionContext:
    """A context whose rotation is the identity (every position 0), so the core and the reference
    attend the same inputs."""
    rope = RotaryEmbedding(D, 10000.0, None, 64, precision="model")  # in float64: exact
    positions = torch.zeros(batch, t, dtype=torch.long)
    return AttentionContext(positions, cu, *rope(positions), rope, sequence_parallel=sequence_parallel)


def core(heads: int, kv_heads: int, **options) -> S2Attention:
    args = ModelArgs(vocab_size=8, hidden_size=heads * D, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=D, attention="s2",
                     attention_options=resolve_options("s2", options))
    return S2Attention(args, 0)


def inputs(batch: int, heads: int, kv_heads: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, t, D, generator=g, dtype=torch.float64).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def reference(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


CASES = [  # rows (document lengths), Hq, Hk, G, shift
    ([[24]], 4, 4, 8, True),
    ([[5, 1, 11, 7], [1, 23]], 4, 2, 6, True),  # 1-token documents, lengths not multiples of G, GQA
    ([[9, 1, 14], [3, 3, 18]], 8, 2, 5, True),  # odd G: a first shifted group of 2
    ([[13, 11]], 6, 3, 4, True),  # the shifted half starts inside a KV group: heads 0-2 | 3-5, KV 0,0,1 | 1,2,2
    ([[5, 1, 11, 7], [1, 23]], 4, 2, 6, False),
    ([[24]], 4, 1, 32, True),  # groups longer than the document: plain causal attention
]


@pytest.mark.parametrize("rows, heads, kv_heads, g, shift", CASES)
def test_forward_and_backward_equal_the_dense_reference(rows, heads, kv_heads, g, shift):
    t = sum(rows[0])
    cu = cu_seqlens_for(rows)
    q, k, v = inputs(len(rows), heads, kv_heads, t)
    mask = reference_mask(rows, heads, g, shift)
    out = core(heads, kv_heads, group_size=g, shift=shift, backend="sdpa")(q, k, v, identity_ctx(cu, len(rows), t))
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_in, mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, x, r in zip("qkv", (q, k, v), ref_in):
        torch.testing.assert_close(x.grad, r.grad, atol=1e-12, rtol=1e-10, msg=f"d{name}")


def test_no_cu_seqlens_is_one_document_per_row():
    q, k, v = inputs(2, 4, 2, 16)
    s2 = core(4, 2, group_size=6)
    out = s2(q, k, v, identity_ctx(None, 2, 16))
    ref = reference(q, k, v, reference_mask([[16], [16]], 4, 6, True))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_equals_the_reference_too():
    """The GPU path (`document_attention` over the group layout), through its CPU FlexAttention forward."""
    rows = [[5, 1, 11, 7]]
    q, k, v = [x.detach().float() for x in inputs(1, 4, 2, 24)]
    out = core(4, 2, group_size=6, backend="flex")(q, k, v, identity_ctx(cu_seqlens_for(rows), 1, 24))
    ref = reference(q, k, v, reference_mask(rows, 4, 6, True))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_each_sequence_parallel_rank_shifts_the_heads_the_whole_model_shifts():
    """Under Ulysses a core sees heads [r*Hq/N, (r+1)*Hq/N): each rank's output is its slice of the
    one-process output (heads 0-1 plain, 2-3 shifted; with N=4 each rank holds one)."""
    rows = [[9, 1, 14]]
    cu = cu_seqlens_for(rows)
    q, k, v = inputs(1, 4, 4, 24)
    whole = core(4, 4, group_size=6)(q, k, v, identity_ctx(cu, 1, 24))
    for n in (2, 4):
        per = 4 // n
        for r in range(n):
            sp = SequenceParallel(group=None, size=n, rank=r)
            s = slice(r * per, (r + 1) * per)
            part = core(4, 4, group_size=6)(q[:, s], k[:, s], v[:, s], identity_ctx(cu, 1, 24, sp))
            torch.testing.assert_close(part, whole[:, s], atol=1e-12, rtol=1e-10)


def test_group_bounds_example():
    spans = [Span(0, 12)]
    assert group_bounds(spans, 4, 0, 12) == [0, 4, 8, 12]
    assert group_bounds(spans, 4, 2, 12) == [0, 2, 6, 10, 12]
    assert group_bounds([Span(0, 3), Span(3, 1), Span(4, 9)], 4, 2, 13) == [0, 2, 3, 4, 6, 10, 13]


@pytest.mark.parametrize("shift", [True, False])
def test_plan_pairs_count_the_reference_mask(shift):
    rows = [[5, 1, 11, 7, 9, 31]]
    mask = reference_mask(rows, 2, 6, shift)  # one plain and one shifted head
    counted = mask.sum().item() / 2
    assert plan_pairs(rows[0], {"group_size": 6, "shift": shift}) == counted


def tiny(kind: str, **options) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention=kind,
                              attention_options=options, max_position_embeddings=256))


def test_one_group_per_document_without_shift_is_intra_doc():
    """Degenerate case: groups at least as long as every document and no shift = `intra_doc`."""
    rows = [[20, 1, 11], [32]]
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    cu = cu_seqlens_for(rows)
    ref = tiny("intra_doc")(ids, cu_seqlens=cu)
    s2 = tiny("s2", group_size=32, shift=False)
    torch.testing.assert_close(s2(ids, cu_seqlens=cu), ref)
    assert not torch.allclose(tiny("s2", group_size=8)(ids, cu_seqlens=cu), ref, atol=1e-4)


def test_the_model_runs_as_full_for_inference():
    assert inference_kind("s2") == "full"
    model = tiny("s2", group_size=8)
    with pytest.raises(LongcptError, match="training only.*'full'"):
        model(torch.zeros(1, 4, dtype=torch.long), state={})


def test_options_are_checked():
    with pytest.raises(LongcptError, match="group_size=1 with shift=true"):
        resolve_options("s2", {"group_size": 1})
    with pytest.raises(LongcptError, match="shift='yes'.*true or false"):
        resolve_options("s2", {"shift": "yes"})
    assert resolve_options("s2", {"group_size": 1, "shift": False})["group_size"] == 1
