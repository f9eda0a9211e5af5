"""InfLLM (`infllm`): against transformers within the window, against a dense brute-force
reference beyond it, pure functions against brute-force versions, batching, bounded state, errors."""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict

import pytest
import torch
from tiny import FAMILIES, ROPE_TYPES, tiny_hf_model

import longcpt
from longcpt.errors import LongcptError
from longcpt.model import CausalLM, ModelArgs
from longcpt.model.attention import AttentionContext, infllm, resolve_options
from longcpt.model.attention.infllm import (
    MASKED,
    OPTIONS,
    BlockCache,
    BlockStore,
    InfLLMAttention,
    InfLLMState,
    block_representatives,
    layout,
    merge_attention,
    retrieve_topk,
    softmax_lse,
)
from longcpt.model.generation import forward_chunks, generate, kv_kept
from longcpt.model.rope import RotaryEmbedding, rotate

pytestmark = pytest.mark.usefixtures("one_thread")  # these tests stream many small steps

SMALL = dict(n_init=4, n_local=32, block_size=8, topk=3, repr_topk=2, exc_block_size=16, max_cached_block=4)


def options(**overrides) -> dict:
    return resolve_options("infllm", {**SMALL, **overrides})


# ----------------------------------------------------------------------------------------------
# Options


def test_defaults_are_the_reference_mistral_config():
    assert {k: o.default for k, o in OPTIONS.items()} == dict(
        block_size=128, n_init=128, n_local=4096, topk=16, repr_topk=4, exc_block_size=512, max_cached_block=32,
        repr_dtype="float32")


@pytest.mark.parametrize("bad,named", [
    ({"n_local": 256, "exc_block_size": 512}, "n_local=256 is smaller than exc_block_size=512"),
    ({"repr_topk": 9, "block_size": 8}, "repr_topk=9 exceeds block_size=8"),
    ({"max_cached_block": 2, "topk": 3}, "max_cached_block=2 is smaller than topk=3"),
    ({"block_size": 0}, "block_size=0: must be a positive integer"),
    ({"topk": -1}, "topk=-1: must be a positive integer"),
    ({"n_init": -1}, "n_init=-1: must be an integer >= 0"),
    ({"n_local": 1.5}, "n_local=1.5: must be a positive integer"),
    ({"window": 3}, "window: not an option of attention kind 'infllm'"),
    ({"repr_dtype": "float16"}, "repr_dtype='float16': must be one of float32, bfloat16"),
])
def test_bad_options_are_named(bad, named):
    with pytest.raises(LongcptError, match=named.replace("(", r"\(").replace(")", r"\)")):
        resolve_options("infllm", {**SMALL, **bad})


def test_infini_model_refuses_infllm(tmp_path):
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, attention="infini", attention_options={"segment_len": 8})
    longcpt.save_pretrained(CausalLM(args), tmp_path)
    with pytest.raises(LongcptError, match="replaces softmax attention.*an .infini. model, whose attention is its own"):
        longcpt.from_pretrained(tmp_path, attention="infllm", **SMALL)


# ----------------------------------------------------------------------------------------------
# Equal to full attention while nothing leaves the window (transformers is the reference).


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_equals_transformers_within_the_window(tmp_path, family, rope):
    hf = tiny_hf_model(family, rope)
    hf.save_pretrained(tmp_path)
    model = longcpt.from_pretrained(tmp_path, attention="infllm", dtype=torch.float32,
                                    **{**SMALL, "n_local": 48}).eval()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        assert (model(ids) - want).abs().max().item() <= 1e-5  # one call: 3 steps of 16
        state: dict = {}
        streamed = torch.cat([model.lm_head(h) for _, h in forward_chunks(model, ids, state, chunk_size=7)], 1)
    assert (streamed - want).abs().max().item() <= 1e-5
    assert all(s.store.n == 0 and s.sink_k.shape[2] == 0 for s in state.values())


# ----------------------------------------------------------------------------------------------
# Pure functions against brute force.


def reference_layout(chunks: list[int], n_init: int, n_local: int, block_size: int) -> tuple[int, int]:
    """The reference's bookkeeping, token lists and loops, after streaming `chunks`."""
    sinks, blocks, remainder, seen = [], [], [], 0
    for c in chunks:
        remainder += list(range(seen, seen + c))
        seen += c
        if len(sinks) < n_init and len(remainder) > n_local:
            take = min(n_init - len(sinks), len(remainder) - n_local)
            sinks, remainder = sinks + remainder[:take], remainder[take:]
        while len(remainder) - block_size >= n_local:
            blocks.append(remainder[:block_size])
            remainder = remainder[block_size:]
    assert sinks == list(range(len(sinks))) and sum(map(len, blocks)) + len(sinks) + len(remainder) == seen
    return len(sinks), len(blocks)


def test_layout_matches_the_reference_bookkeeping_for_any_chunking():
    rng = random.Random(0)
    for _ in range(300):
        n_init, n_local, size = rng.randint(0, 9), rng.randint(1, 20), rng.randint(1, 9)
        chunks = [rng.randint(1, n_local) for _ in range(rng.randint(1, 30))]
        assert layout(sum(chunks), n_init, n_local, size) == reference_layout(chunks, n_init, n_local, size)


def test_block_representatives_against_loops():
    g = torch.Generator().manual_seed(0)
    b, hk, g_, n, s, d, r = 2, 2, 3, 4, 8, 5, 3
    keys = torch.randn(b, hk, n, s, d, generator=g)
    scores = torch.rand(b, hk * g_, n, s, generator=g)
    got = block_representatives(keys, scores, r)
    assert got.shape == (b, n, hk * g_, d) and got.dtype == torch.float32
    for bi in range(b):
        for h in range(hk * g_):
            for ni in range(n):
                best = sorted(range(s), key=lambda j: -scores[bi, h, ni, j].item())[:r]
                want = torch.stack([keys[bi, h // g_, ni, j] for j in best]).mean(0)
                assert torch.allclose(got[bi, ni, h], want, atol=1e-6)


def test_retrieve_topk_against_loops():
    g = torch.Generator().manual_seed(0)
    reps, query = torch.randn(3, 40, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    got = retrieve_topk(reps, query, 5)
    for b in range(3):
        scores = [sum(float(reps[b, n, h] @ query[b, h]) for h in range(4)) for n in range(40)]
        assert got[b].tolist() == sorted(sorted(range(40), key=lambda n: -scores[n])[:5])
    assert retrieve_topk(reps[:, :5], query, 5).tolist() == [list(range(5))] * 3  # at most topk: all


def test_merge_attention_equals_one_softmax():
    g = torch.Generator().manual_seed(0)
    s, v = torch.randn(2, 3, 7, 20, generator=g), torch.randn(2, 3, 20, 4, generator=g)
    s[..., 3, :8] = MASKED  # query 3 sees nothing of the first part
    want = torch.softmax(s, -1) @ v
    parts = []
    for lo, hi in ((0, 8), (8, 9), (9, 20)):
        p, lse = softmax_lse(s[..., lo:hi])
        parts.append((p @ v[..., lo:hi, :], lse))
    out, lse = merge_attention(parts)
    assert torch.allclose(out, want, atol=1e-6) and torch.allclose(lse[..., :3], s[..., :3, :].logsumexp(-1), atol=1e-6)
    assert lse[..., 3].sub(s[..., 3, 8:].logsumexp(-1)).abs().max() <= 1e-6
    assert torch.allclose(softmax_lse(s)[1], torch.logsumexp(s, -1), atol=1e-6)


def test_lru_cache_hits_evictions_and_read_back():
    g = torch.Generator().manual_seed(0)
    store = BlockStore(batch=2, n_heads=2, n_kv_heads=1, block_size=4, head_dim=3, dtype=torch.float32)
    k, v = torch.randn(2, 150, 1, 4, 3, generator=g), torch.randn(2, 150, 1, 4, 3, generator=g)
    store.append(k, v, torch.zeros(2, 150, 2, 3))  # 150 blocks: three pages
    cache = BlockCache(store, capacity=5, device="cpu", staging=2)  # misses travel two blocks at a time
    rng = random.Random(1)
    model = [OrderedDict() for _ in range(2)]  # brute-force LRU: block -> None, least recent first
    hits = misses = evictions = 0
    for _ in range(200):
        selected = [rng.sample(range(12) if rng.random() < 0.7 else range(150), 3) for _ in range(2)]
        for row, ids in enumerate(selected):
            for i in ids:
                if i in model[row]:
                    hits += 1
                    model[row].move_to_end(i)
                else:
                    misses += 1
                    if len(model[row]) == 5:
                        model[row].pop(next(j for j in model[row] if j not in ids))
                        evictions += 1
                    model[row][i] = None
        got_k, got_v = cache.fetch(torch.tensor(selected))  # (B, Hk, 3*S, D)
        for row, ids in enumerate(selected):
            assert list(cache.slots[row]) == list(model[row])
            for j, i in enumerate(ids):  # every block reads back as stored, evicted and reloaded or not
                assert torch.equal(got_k[row, :, 4 * j : 4 * j + 4], k[row, i])
                assert torch.equal(got_v[row, :, 4 * j : 4 * j + 4], v[row, i])
    assert (cache.hits, cache.misses, cache.evictions) == (hits, misses, evictions)
    assert cache.hits > 100 and cache.evictions > 50


# ----------------------------------------------------------------------------------------------
# The layer against a dense brute-force reference of InfLLM's rules.


def run_layer(core, q, k, v, state: dict, rope, chunks: list[int]) -> torch.Tensor:
    """Feed q/k/v (B, H, T, D) through one `infllm` core in calls of the given sizes."""
    outs, at = [], 0
    for c in chunks:
        pos = torch.arange(at, at + c)[None].expand(q.shape[0], c)
        ctx = AttentionContext(pos, None, None, None, rope, state=state)
        outs.append(core(q[:, :, at : at + c], k[:, :, at : at + c], v[:, :, at : at + c], ctx))
        at += c
    return torch.cat(outs, 2)


def dense_reference(q, k, v, rope, n_local: int, visible=None):
    """Attention where key j sits at distance i - j from query i inside the window and at n_local - 1
    outside it, one softmax per query over every visible earlier key. Returns (out, probabilities)."""
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    cos, sin = rope(torch.arange(n_local)[None])  # (1, n_local, D)
    k0 = rotate(k, cos[:, :1], sin[:, :1]).repeat_interleave(group, 1)  # keys at angle 0, per query head
    vq = v.repeat_interleave(group, 1)
    out, probs = torch.zeros_like(q), torch.zeros(b, hq, t, t)
    for i in range(t):
        q_at = rotate(q[:, :, i : i + 1].expand(b, hq, n_local, d), cos, sin)  # q_i rotated by every distance
        dist = (i - torch.arange(i + 1)).clamp(max=n_local - 1)
        logits = (q_at[:, :, dist] * k0[:, :, : i + 1]).sum(-1) * d**-0.5  # (B, Hq, i+1)
        if visible is not None:
            logits = logits.masked_fill(~visible[:, None, : i + 1], float("-inf"))
        p = torch.softmax(logits, -1)
        probs[:, :, i, : i + 1] = p
        out[:, :, i] = (p[..., None] * vq[:, :, : i + 1]).sum(2)
    return out, probs


def layer_inputs(b=2, hq=4, hk=2, t=200, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g), torch.randn(b, hk, t, d, generator=g),
            torch.randn(b, hk, t, d, generator=g))


def core_for(opts: dict) -> InfLLMAttention:
    return InfLLMAttention(dataclasses.make_dataclass("A", [("attention_options", dict)])(opts), 0)


@pytest.mark.parametrize("rope_type,tile", [("default", 128), ("default", 5), ("yarn", 7)])
def test_all_blocks_retrieved_equals_one_softmax_with_assigned_positions(monkeypatch, rope_type, tile):
    """topk >= blocks: every earlier token is attended, window keys at their distance, the rest at
    n_local - 1; the block representatives equal the brute-force ones from the same probabilities.
    Small query tiles cut every step into several."""
    monkeypatch.setattr(infllm, "QUERY_TILE", tile)
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16} if rope_type == "yarn" else None
    rope = RotaryEmbedding(8, 10000.0, scaling, 64)
    opts = options(topk=40, max_cached_block=40)
    q, k, v = layer_inputs()
    state: dict = {}
    got = run_layer(core_for(opts), q, k, v, state, rope, [5, 16, 1, 1, 30, 47, 100])
    want, probs = dense_reference(q, k, v, rope, opts["n_local"])
    assert (got - want).abs().max().item() <= 1e-5
    s = state[0]
    n_sinks, n_blocks = layout(200, opts["n_init"], opts["n_local"], opts["block_size"])
    assert (s.sink_k.shape[2], s.store.n) == (n_sinks, n_blocks) == (4, 20)
    assert torch.equal(s.sink_k, k[:, :, :n_sinks]) and torch.equal(s.pend_k, k[:, :, n_sinks + 8 * n_blocks :])
    # scores: the probability every key received from the queries whose window held it
    i, j = torch.arange(200)[:, None], torch.arange(200)[None]
    in_window = ((i - j) >= 0) & ((i - j) < opts["n_local"])
    score = (probs * in_window).sum(2)  # (B, Hq, T)
    for n in range(n_blocks):
        lo = n_sinks + 8 * n
        stored_k, _ = s.store.block(1, n)
        assert torch.equal(stored_k, k[1, :, lo : lo + 8])
        want_reps = block_representatives(k[:, :, None, lo : lo + 8], score[:, :, None, lo : lo + 8], 2)[:, 0]
        assert torch.allclose(s.store.reps.all()[:, n], want_reps, atol=1e-5)


def test_retrieval_limits_attention_to_sinks_selected_blocks_and_pending(monkeypatch):
    for name, value in (("QUERY_TILE", 6), ("PAGE_BLOCKS", 4), ("REPS_PAGE_BLOCKS", 5), ("REPS_FIRST_BLOCKS", 2)):
        monkeypatch.setattr(infllm, name, value)  # several pages, and the newest one grown in place
    rope = RotaryEmbedding(8, 10000.0, None, 64)
    opts = options(topk=2, max_cached_block=2)
    q, k, v = layer_inputs(t=181)
    state: dict = {}
    got = run_layer(core_for(opts), q, k, v, state, rope, [180, 1])  # the last call: one decoding step
    s = state[0]
    assert s.store.n > opts["topk"] and s.selected.shape == (2, 2)
    visible = torch.zeros(2, 181, dtype=torch.bool)
    visible[:, : s.sink_k.shape[2]] = True
    visible[:, s.pending_start :] = True
    for row in range(2):
        for n in s.selected[row].tolist():
            lo = opts["n_init"] + 8 * n
            visible[row, lo : lo + 8] = True
    want, probs = dense_reference(q, k, v, rope, opts["n_local"], visible)
    assert (got[:, :, -1] - want[:, :, -1]).abs().max().item() <= 1e-5
    # the retrieved blocks are the best by the brute-force score of the step's memory query
    cos, sin = rope(torch.arange(opts["n_local"])[None])
    q_mem = rotate(q[:, :, -1:], cos[:, -1:], sin[:, -1:])[:, :, 0]  # (B, Hq, D)
    reps = s.store.reps.all()
    assert reps.shape == (2, s.store.n, 4, 8) and len(s.store.reps.pages) == -(-s.store.n // 5)
    blocks = [[sum(float(reps[b, n, h] @ q_mem[b, h]) for h in range(4)) for n in range(s.store.n)]
              for b in range(2)]
    assert s.selected.tolist() == [sorted(sorted(range(len(x)), key=lambda n: -x[n])[:2]) for x in blocks]
    assert s.visible_share(0, torch.arange(181), since=180) == pytest.approx(visible[0].float().mean().item())
    some = torch.tensor([0, 1, 30, 31, 32, 100, 150, 170, 180])
    assert s.visible_share(1, some, since=180) == pytest.approx(visible[1, some].float().mean().item())
    # the attention mass of the last query: the dense softmax's probabilities, mean over heads
    for row, positions in ((0, some), (1, torch.arange(181)), (1, torch.arange(4, 60))):
        assert s.attention_on(row, positions) == pytest.approx(probs[row, :, -1, positions].sum(-1).mean().item(),
                                                               abs=1e-5)


def test_representatives_grow_in_pages_on_the_device_dtype(monkeypatch):
    """Appends of any size land in pages that double up to REPS_PAGE_BLOCKS; retrieval scans them all."""
    monkeypatch.setattr(infllm, "REPS_PAGE_BLOCKS", 8)
    monkeypatch.setattr(infllm, "REPS_FIRST_BLOCKS", 2)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        reps = infllm.Representatives(2, 3, 4, dtype, torch.device("cpu"))
        added = [torch.randn(2, n, 3, 4, generator=g) for n in (1, 1, 3, 9, 2, 17)]
        for x in added:
            reps.append(x)
        want = torch.cat(added, 1).to(dtype)
        assert reps.n == 33 and torch.equal(reps.all(), want) and reps.all().dtype == dtype
        assert [p.shape[1] for p in reps.pages] == [8, 8, 8, 8, 2]  # the newest page grew 2 -> ... only to fit
        query = torch.randn(2, 3, 4, generator=g)
        assert torch.equal(reps.search(query, 5), retrieve_topk(want, query.to(dtype), 5))


def brute_force_infllm(q, k, v, rope, opts: dict, calls: list[int]):
    """InfLLM by its rules, query by query, in loops and dense softmaxes (no code of the module).

    Each call is cut into steps of exc_block_size queries from its first token. Before a step, the
    sinks and blocks are the reference's bookkeeping after the previous steps (`reference_layout`);
    a block's representative for head h is the mean key of its repr_topk tokens with the most
    window attention from h (complete by then: its tokens have left every later query's window);
    the step's queries, rotated at the memory angle n_local - 1 and averaged, score the blocks
    (dot product summed over heads) and the topk best are chosen (all while there are at most
    topk). Each query then attends, in one softmax, to the sinks, the chosen blocks and every
    pending token up to itself, at distance i - j inside its window and n_local - 1 outside.

    Returns:
        (out (B, Hq, T, D), chosen blocks per step: [[blocks of row 0], [row 1], ...] per step).
    """
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    n_init, n_local, size = opts["n_init"], opts["n_local"], opts["block_size"]
    cos, sin = rope(torch.arange(n_local)[None])  # (1, n_local, D)
    k0 = rotate(k, cos[:, :1], sin[:, :1]).repeat_interleave(g, 1)  # keys at angle 0, per query head
    vq = v.repeat_interleave(g, 1)
    q_mem = torch.stack([rotate(q[:, :, i : i + 1], cos[:, -1:], sin[:, -1:])[:, :, 0] for i in range(t)], 2)
    window_score = torch.zeros(b, hq, t)  # attention each key received while in a query's window
    out, chosen_per_step, done = torch.zeros_like(q), [], []
    steps = [(at + s0, min(opts["exc_block_size"], c - s0))
             for at, c in zip([sum(calls[:i]) for i in range(len(calls))], calls)
             for s0 in range(0, c, opts["exc_block_size"])]
    for first, c in steps:
        n_sinks, n_blocks = reference_layout(done, n_init, n_local, size) if done else (0, 0)
        chosen = [[] for _ in range(b)]
        if n_blocks:
            mean_q = q_mem[:, :, first : first + c].mean(2)  # (B, Hq, D)
            for row in range(b):
                scores = []
                for n in range(n_blocks):
                    lo, total = n_sinks + n * size, 0.0
                    for h in range(hq):
                        best = sorted(range(lo, lo + size), key=lambda j: -window_score[row, h, j].item())
                        rep = torch.stack([k[row, h // g, j] for j in best[: opts["repr_topk"]]]).mean(0)
                        total += float(rep @ mean_q[row, h])
                    scores.append(total)
                top = sorted(range(n_blocks), key=lambda n: -scores[n])[: opts["topk"]]
                chosen[row] = sorted(top)
        chosen_per_step.append(chosen)
        pending_start = n_sinks + n_blocks * size
        for i in range(first, first + c):
            visible = torch.zeros(b, i + 1, dtype=torch.bool)
            visible[:, :n_sinks] = True
            visible[:, pending_start:] = True
            for row in range(b):
                for n in chosen[row]:
                    visible[row, n_sinks + n * size : n_sinks + (n + 1) * size] = True
            q_at = rotate(q[:, :, i : i + 1].expand(b, hq, n_local, d), cos, sin)  # q_i at every distance
            dist = (i - torch.arange(i + 1)).clamp(max=n_local - 1)
            logits = (q_at[:, :, dist] * k0[:, :, : i + 1]).sum(-1) * d**-0.5  # (B, Hq, i+1)
            p = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), -1)
            out[:, :, i] = (p[..., None] * vq[:, :, : i + 1]).sum(2)
            in_window = torch.arange(i + 1) > i - n_local
            window_score[:, :, : i + 1] += p * in_window
        done.append(c)
    return out, chosen_per_step


@pytest.mark.parametrize("calls", [[400], [150, 7, 243], [399, 1]])
def test_prefill_with_fewer_blocks_retrieved_than_stored_equals_brute_force(calls):
    """topk < blocks in steps of many queries: every position, and every step's choice, equal the
    brute force (a retrieval with another query than the step's mean memory query fails here)."""
    rope = RotaryEmbedding(8, 10000.0, None, 512)
    opts = options(topk=2, max_cached_block=2)
    q, k, v = layer_inputs(t=400, seed=5)
    state: dict = {}
    got = run_layer(core_for(opts), q, k, v, state, rope, calls)
    want, chosen = brute_force_infllm(q, k, v, rope, opts, calls)
    s = state[0]
    assert s.store.n > 4 * opts["topk"]
    assert (got - want).abs().max().item() <= 1e-5
    logged = [selected.tolist() for *_, selected in s.log if selected is not None]
    assert logged == [c for c in chosen if c[0]][-len(logged):]
    assert sum(len(set(map(tuple, c))) > 1 for c in chosen) > 3  # rows often choose different blocks


def test_generation_reads_the_last_prompt_token_alone_like_the_reference():
    """generate(): the query that predicts the first new token retrieves with its own query, as the
    reference's generation (prefill all but the last token, then the last alone); the whole prompt
    in one call would retrieve with the mean of its last step and attend to other blocks."""
    model = tiny("infllm", **{**SMALL, "topk": 2, "max_cached_block": 2})
    model.model.layers = model.model.layers[:1]  # one layer: q/k/v do not depend on earlier retrievals
    ids = torch.randint(0, 64, (2, 301), generator=torch.Generator().manual_seed(4))
    core, seen = model.model.layers[0].self_attn.core, []
    hook = core.register_forward_hook(lambda mod, args, out: seen.append((args[0], args[1], args[2], out)))
    try:
        generate(model, ids, 1, prefill_chunk=128)
    finally:
        hook.remove()
    q, k, v, got = (torch.cat([call[i] for call in seen], 2) for i in range(4))
    assert [call[0].shape[2] for call in seen] == [128, 128, 44, 1]
    rope = model.model.rotary_emb
    want, chosen = brute_force_infllm(q, k, v, rope, core.options, [128, 128, 44, 1])
    assert (got[:, :, -1] - want[:, :, -1]).abs().max().item() <= 1e-5
    whole, chosen_whole = brute_force_infllm(q, k, v, rope, core.options, [301])
    assert chosen_whole[-1] != chosen[-1]  # this prompt tells the two protocols apart
    assert (whole[:, :, -1] - want[:, :, -1]).abs().max().item() > 1e-3


def test_batch_rows_are_independent_and_the_cache_path_is_exact():
    rope = RotaryEmbedding(8, 10000.0, None, 64)
    opts = options(topk=2, max_cached_block=3)
    q, k, v = layer_inputs(b=3, t=300, seed=3)
    chunks = [64] * 4 + [1] * 44
    state: dict = {}
    batched = run_layer(core_for(opts), q, k, v, state, rope, chunks)
    assert len({tuple(row) for row in state[0].selected.tolist()}) > 1  # rows retrieve different blocks
    for row in range(3):
        alone = run_layer(core_for(opts), q[row : row + 1], k[row : row + 1], v[row : row + 1], {}, rope, chunks)
        assert (batched[row : row + 1] - alone).abs().max().item() <= 1e-5
    cached_state = {0: InfLLMState(opts, 3, 4, 2, 8, torch.float32, torch.device("cpu"), use_cache=True)}
    cached = run_layer(core_for(opts), q, k, v, cached_state, rope, chunks)
    assert torch.equal(cached, batched)
    cache = cached_state[0].cache
    assert cache.hits > 0 and cache.evictions > 0


@pytest.mark.gpu
def test_on_cuda_retrieval_stays_on_the_device_and_only_the_staging_buffer_is_pinned():
    """The representatives and the top-k live on the GPU; the host pages are pageable; the cache path
    (pinned staging buffer, asynchronous copies) gives the CPU's outputs."""
    rope = RotaryEmbedding(8, 10000.0, None, 64)
    opts = options(topk=2, max_cached_block=3)
    q, k, v = layer_inputs(b=2, t=300, seed=3)
    chunks = [64] * 4 + [1] * 44
    want = run_layer(core_for(opts), q, k, v, {}, rope, chunks)
    state: dict = {}
    got = run_layer(core_for(opts), q.cuda(), k.cuda(), v.cuda(), state, RotaryEmbedding(8, 10000.0, None, 64).cuda(),
                    chunks)
    s = state[0]
    assert (got.cpu() - want).abs().max().item() <= 1e-4
    assert all(p.is_cuda for p in s.store.reps.pages) and s.selected.is_cuda
    assert not any(p.is_pinned() for p in s.store.pages_k + s.store.pages_v)
    assert s.cache.stage.is_pinned() and s.cache.stage.shape[1] == 2 * opts["topk"]


def test_device_state_is_bounded_while_streaming_256k_tokens():
    """Sinks + pending + scores stay under their bound at every call; the host store grows linearly."""
    opts = options(n_init=16, n_local=256, block_size=64, topk=2, repr_topk=2, exc_block_size=256, max_cached_block=2)
    rope = RotaryEmbedding(8, 10000.0, None, 1 << 20)
    core, state, g = core_for(opts), {}, torch.Generator().manual_seed(0)
    b, hq, hk, d, call, total = 1, 2, 1, 8, 16384, 1 << 18
    # per token on the device: K and V (2 * Hk * D floats) and a score per query head
    per_token = 4 * (2 * hk * d + hq)
    bound = per_token * (opts["n_init"] + opts["n_local"] + opts["block_size"] + opts["exc_block_size"])
    device_peak = 0
    for at in range(0, total, call):
        q, k, v = (torch.randn(b, h, call, d, generator=g) for h in (hq, hk, hk))
        ctx = AttentionContext(torch.arange(at, at + call)[None], None, None, None, rope, state=state)
        with torch.no_grad():
            core(q, k, v, ctx)
        device_peak = max(device_peak, state[0].device_bytes())
    s = state[0]
    assert device_peak <= bound and s.store.n == layout(total, 16, 256, 64)[1]
    # the host store: whole pages of K/V, nothing else; the representatives are on the device
    kv_pages = -(-s.store.n // infllm.PAGE_BLOCKS)
    assert s.host_bytes() == 4 * kv_pages * infllm.PAGE_BLOCKS * 64 * 2 * hk * d
    assert s.host_bytes(stored=True) == s.store.n * 4 * 64 * 2 * hk * d  # what the pages hold
    assert s.store.n * 4 * hq * d <= s.reps_bytes() <= 2 * s.store.n * 4 * hq * d  # at most one page unfilled
    per_token = 4 * (2 * hk * d + hq * d / opts["block_size"])
    print(f"{per_token:.1f} bytes/token (host K/V {8 * hk * d}, device representatives {4 * hq * d / 64:.2f}), "
          f"{s.host_bytes() / total:.1f} allocated; device state <= {device_peak} bytes (bound {bound})")


# ----------------------------------------------------------------------------------------------
# The model: generation, errors, kv_kept.


def tiny(kind: str, **opts) -> CausalLM:
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, attention=kind, attention_options=opts)
    return CausalLM(args).eval()


def test_generation_equals_full_within_the_window_and_runs_beyond():
    full, ours = tiny("full"), tiny("infllm", **{**SMALL, "n_local": 64})
    ours.load_state_dict(full.state_dict())
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(ours, ids, 20, prefill_chunk=16), generate(full, ids, 20, prefill_chunk=16))
    state: dict = {}
    long_ids = torch.randint(0, 64, (2, 500), generator=torch.Generator().manual_seed(1))
    out = generate(ours, long_ids, 5, prefill_chunk=128, state=state)
    assert out.shape == (2, 5)
    kept = kv_kept(state)
    # sinks 4 + 3 blocks of 8 + pending (64..71 tokens) of 504 tokens read
    assert (4 + 24 + 64) / 504 <= kept <= (4 + 24 + 72) / 504


def test_misuse_is_an_error():
    model = tiny("infllm", **SMALL)
    ids = torch.randint(0, 64, (1, 10))
    with pytest.raises(LongcptError, match="packed documents"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    state: dict = {}
    model(ids, state=state)
    with pytest.raises(LongcptError, match="starts at position 0 with 1 rows, but the state holds 10 tokens"):
        model(ids, state=state)
