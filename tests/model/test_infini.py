"""Infini-attention forward: against transformers' Llama (one segment), a from-the-equations
reference (several segments), packed documents, streaming with a state, bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_infini
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from longcpt.batch import position_ids
from longcpt.errors import LongcptError
from longcpt.model import CausalLM, ModelArgs, from_pretrained
from longcpt.model.attention import AttentionContext, resolve_options
from longcpt.model.attention.infini import InfiniAttention, plan_segments
from longcpt.model.rope import RotaryEmbedding

VOCAB = 64


def hf_llama(path, seed=0, rope_scaling=None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rope_theta=10000.0,
        rope_scaling=rope_scaling, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def gate_scaled_copy(hf: LlamaForCausalLM, ours: CausalLM) -> LlamaForCausalLM:
    """transformers' model whose o_proj input of head h is scaled by 1 - sigmoid(gate_h)."""
    for hf_layer, layer in zip(hf.model.layers, ours.model.layers):
        keep = 1 - torch.sigmoid(layer.self_attn.core.gate.detach())  # (Hq,)
        scale = keep.repeat_interleave(hf.config.head_dim)  # (Hq*D,)
        hf_layer.self_attn.o_proj.weight.data *= scale[None, :]
    return hf


@pytest.mark.parametrize(
    "segment_len,rope_scaling",
    [(24, None), (100, None), (24, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})],
)
def test_one_segment_equals_transformers_attention_scaled_by_gate(tmp_path, segment_len, rope_scaling):
    hf = hf_llama(tmp_path, rope_scaling=rope_scaling)
    ours = from_pretrained(tmp_path, attention="infini", segment_len=segment_len).eval()
    for core in ours.modules():
        if isinstance(core, InfiniAttention):
            core.gate.data.uniform_(-2.0, 2.0)
    hf = gate_scaled_copy(hf, ours)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_packed_documents_shorter_than_a_segment_equal_transformers_per_document(tmp_path):
    hf = hf_llama(tmp_path)
    ours = from_pretrained(tmp_path, attention="infini", segment_len=16).eval()
    for core in ours.modules():
        if isinstance(core, InfiniAttention):
            core.gate.data.uniform_(-2.0, 2.0)
    hf = gate_scaled_copy(hf, ours)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, 7, 20, 33, 40], dtype=torch.int32)  # row 0: 7 + 13, row 1: 13 + 7
    with torch.no_grad():
        packed = ours(ids, position_ids=position_ids("document", cu, 2, 20), cu_seqlens=cu).view(-1, VOCAB)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = hf(ids.view(-1)[start:end][None]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)


def test_gates_of_a_plain_checkpoint_start_at_gate_init(tmp_path):
    hf_llama(tmp_path)
    model = from_pretrained(tmp_path, attention="infini", gate_init=-1.5)
    gates = [m.gate for m in model.modules() if isinstance(m, InfiniAttention)]
    assert len(gates) == 2
    names = [n for n, _ in model.named_parameters() if n.endswith(".core.gate")]
    assert names == ["model.layers.0.self_attn.core.gate", "model.layers.1.self_attn.core.gate"]
    for gate in gates:
        assert gate.shape == (4,)
        assert torch.equal(gate.detach(), torch.full((4,), -1.5))


# ----------------------------------------------------------------------------------------------
# Several segments: against the paper's equations written out head by head.


def reference_infini(q, k, v, gate, segment_len, delta):
    """Infini-attention from the equations (arXiv 2404.07143 eqs. 7-10), one head at a time.

    q (B, Hq, T, D), k/v (B, Hk, T, D) un-rotated; local RoPE by transformers' own functions.
    """
    b, hq, t, d = q.shape
    groups = hq // k.shape[1]
    rope = LlamaRotaryEmbedding(config=LlamaConfig(hidden_size=d * hq, num_attention_heads=hq, head_dim=d))
    out = torch.zeros_like(q)
    for row in range(b):
        for h in range(hq):
            kv = h // groups
            memory, norm, written = torch.zeros(d, d), torch.zeros(d), False
            for s0 in range(0, t, segment_len):
                qs, ks, vs = q[row, h, s0 : s0 + segment_len], k[row, kv, s0 : s0 + segment_len], v[row, kv, s0 : s0 + segment_len]
                n = qs.shape[0]
                cos, sin = rope(qs[None], torch.arange(n)[None])
                qr, kr = apply_rotary_pos_emb(qs[None, None], ks[None, None], cos, sin)
                scores = (qr[0, 0] @ kr[0, 0].T) / math.sqrt(d)
                scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
                a_dot = scores.softmax(-1) @ vs
                sq, sk = F.elu(qs) + 1, F.elu(ks) + 1
                a_mem = (sq @ memory) / (sq @ norm)[:, None] if written else torch.zeros_like(a_dot)
                g = torch.sigmoid(gate[h])
                out[row, h, s0 : s0 + n] = g * a_mem + (1 - g) * a_dot
                if n == segment_len:
                    update = vs - (sk @ memory) / (sk @ norm)[:, None] if (delta and written) else vs
                    memory, norm, written = memory + sk.T @ update, norm + sk.sum(0), True
    return out


@pytest.mark.parametrize("memory_update", ["linear", "delta"])
def test_core_equals_the_equations_over_several_segments(memory_update):
    args = ModelArgs(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, attention="infini",
                     attention_options=resolve_options("infini", {"segment_len": 6, "memory_update": memory_update}))
    core = InfiniAttention(args, 0)
    core.gate.data = torch.tensor([-3.0, -0.5, 0.5, 3.0])
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 23, 8, generator=g), torch.randn(2, 2, 23, 8, generator=g), torch.randn(2, 2, 23, 8, generator=g)
    rope = RotaryEmbedding(8, 10000.0)
    positions = torch.arange(23).expand(2, 23)
    cos, sin = rope(positions)
    with torch.no_grad():
        got = core(q, k, v, AttentionContext(positions, None, cos, sin, rope))
    expected = reference_infini(q, k, v, core.gate.detach(), 6, memory_update == "delta")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Not vacuous: the memory read matters, and the two rules differ once the memory is non-empty.
    other = reference_infini(q, k, v, core.gate.detach(), 6, memory_update != "delta")
    assert torch.equal(other[:, :, :12], expected[:, :, :12])
    assert (other[:, :, 12:] - expected[:, :, 12:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Documents and segments.


def test_plan_follows_its_docstring_example():
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    assert position_ids("document", cu, 1, 6).tolist() == [[0, 1, 2, 3, 0, 1]]
    plan = plan_segments(torch.arange(2, 9)[None], None, 4)
    pieces = [[(grp.offset, grp.index.tolist()) for grp in step] for step in plan.steps]
    assert pieces == [[(2, [[0, 1]])], [(0, [[2, 3, 4, 5]])], [(0, [[6]])]]
    assert plan.inverse is None  # already in flat order


def test_packed_plan_groups_equal_pieces_and_restores_order():
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)  # one row: documents of 5, 3 and 8 tokens
    plan = plan_segments(position_ids("document", cu, 1, 16), cu, 4)
    assert plan.n_streams == 3
    assert [[(grp.streams, grp.length) for grp in step] for step in plan.steps] == [
        [((0, 2), 4), ((1,), 3)],  # first pieces: doc 0 and doc 2 are 4 long, doc 1 is 3 long
        [((0,), 1), ((2,), 4)],
    ]
    order = torch.cat([grp.index.reshape(-1) for step in plan.steps for grp in step])
    assert torch.equal(order[plan.inverse], torch.arange(16))


def test_no_information_crosses_a_document_boundary():
    model = tiny_infini()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 30), generator=g)
    cu = torch.tensor([0, 11, 30, 47, 60], dtype=torch.int32)  # documents of 11, 19, 17 and 13 tokens
    positions = position_ids("document", cu, 2, 30)  # restarting at 0 in every document
    with torch.no_grad():
        packed = model(ids, position_ids=positions, cu_seqlens=cu).view(-1, VOCAB)
        flat = ids.view(-1)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(packed[start:end], model(flat[start:end][None])[0], rtol=1e-5, atol=1e-5)
        # Changing document 0 changes nothing in document 1 (which follows it in the row).
        other = ids.clone()
        other[0, :11] = torch.randint(0, VOCAB, (11,), generator=g)
        changed = model(other, position_ids=positions, cu_seqlens=cu).view(-1, VOCAB)
    assert (changed[:11] - packed[:11]).abs().max() > 1e-3
    assert torch.equal(changed[11:], packed[11:])


# ----------------------------------------------------------------------------------------------
# Streaming with a caller-owned state.


def stream(model, ids, sizes, state=None):
    """Feed `ids` (B, T) in chunks of the given sizes with absolute positions; concat logits."""
    state = {} if state is None else state
    out, pos = [], 0
    for size in sizes:
        chunk = ids[:, pos : pos + size]
        positions = torch.arange(pos, pos + chunk.shape[1]).expand(ids.shape[0], -1)
        out.append(model(chunk, position_ids=positions, state=state))
        pos += chunk.shape[1]
    assert pos == ids.shape[1]
    return torch.cat(out, dim=1), state


@pytest.mark.parametrize(
    "sizes", [[1] * 37, [3, 5, 8, 1, 20], [8, 8, 8, 8, 5], [17, 20], [37]], ids=["tokens", "mixed", "segments", "cross", "one"]
)
@pytest.mark.parametrize("memory_update", ["linear", "delta"])
def test_streaming_in_any_chunks_equals_one_call(sizes, memory_update):
    model = tiny_infini(memory_update=memory_update)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = model(ids)
        streamed, state = stream(model, ids, sizes)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)
    assert state[0].pending(0) == 37 % 8  # the unfinished fifth segment waits in the state


def test_streaming_state_stays_bounded():
    model = tiny_infini()
    n, kv_heads, d = 8, 2, 8
    ids = torch.randint(0, VOCAB, (1, 40 * n), generator=torch.Generator().manual_seed(6))
    state: dict = {}
    sizes = []
    with torch.no_grad():
        for pos in range(0, ids.shape[1], 3):
            stream_chunk = ids[:, pos : pos + 3]
            positions = torch.arange(pos, pos + stream_chunk.shape[1])[None]
            model(stream_chunk, position_ids=positions, state=state)
            sizes.append(sum(s.nbytes() for s in state.values()))
    # Per layer: M and z in float32, plus fewer than N cached keys and values in float32.
    bound = 2 * (kv_heads * d * (d + 1) * 4 + 2 * (n - 1) * kv_heads * d * 4)
    assert max(sizes) <= bound
    assert state[0].memory.dtype == torch.float32
    # Chunks of 3 against segments of 8: the same phase recurs every 8 calls, with the same size.
    assert sizes[16:24] == sizes[96:104]


def test_misused_state_and_positions_fail_with_a_message():
    model = tiny_infini()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        state: dict = {}
        model(ids[:, :5], position_ids=torch.arange(5)[None], state=state)
        with pytest.raises(LongcptError, match="resumes at local position"):
            model(ids[:, 5:9], position_ids=torch.arange(6, 10)[None], state=state)  # skipped position 5
        with pytest.raises(LongcptError, match="resumes at local position"):
            model(ids[:, :4], position_ids=torch.arange(3, 7)[None])  # mid-segment start, no state
        with pytest.raises(LongcptError, match="streams"):
            model(ids[:, :4].expand(2, 4), position_ids=torch.arange(5, 9).expand(2, 4), state=state)
        with pytest.raises(LongcptError, match="increase by one"):
            model(ids[:, :4], position_ids=torch.tensor([[0, 1, 3, 4]]))


def test_options_are_checked_with_every_problem_named():
    with pytest.raises(LongcptError) as err:
        resolve_options("infini", {"segment_len": 0, "memory_update": "fast", "segmnet_len": 4, "gate_init": float("nan")})
    message = str(err.value)
    for part in ("segment_len=0", "memory_update='fast'", "segmnet_len: not an option", "gate_init=nan"):
        assert part in message
    assert resolve_options("infini", {"segment_len": 4})["memory_update"] == "delta"
    with pytest.raises(LongcptError, match="segment_len=0"):  # a model is never built with bad options
        tiny_infini(segment_len=0)


# ----------------------------------------------------------------------------------------------
# bf16


def test_memory_stays_float32_and_finite_in_bf16():
    model32 = tiny_infini(seed=7)
    with torch.no_grad():  # large keys and values: bf16 sums of sk^T v would overflow
        for layer in model32.model.layers:
            layer.self_attn.k_proj.weight.mul_(40)
            layer.self_attn.v_proj.weight.mul_(40)
    model16 = tiny_infini(seed=7, dtype=torch.bfloat16)
    model16.load_state_dict(model32.state_dict())
    ids = torch.randint(0, VOCAB, (1, 64 * 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        streamed, state = stream(model16, ids, [100] * 5 + [12])
        expected = model32(ids)
    assert state[1].memory.dtype == torch.float32 and torch.isfinite(state[1].memory).all()
    assert torch.isfinite(streamed).all()
    similarity = F.cosine_similarity(streamed.float().flatten(1), expected.flatten(1)).min()
    assert similarity > 0.99
