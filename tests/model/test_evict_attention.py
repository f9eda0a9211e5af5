"""The reference evictions `h2o` and `streaming`, and the eviction bookkeeping they share with NAMM."""

from __future__ import annotations

import pytest
import torch
from eviction_reference import run_model, simulate
from tiny import tiny_hf_model

import longcpt
from longcpt.errors import LongcptError
from longcpt.model import CausalLM, ModelArgs
from longcpt.model.attention.evict import EvictingCache
from longcpt.model.attention.full import KVCache
from longcpt.model.generation import cache_use, forward_chunks, generate, kv_kept
from longcpt.model.rope import apply_rotary

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def _pair(kind: str, **options) -> tuple[CausalLM, CausalLM]:
    """A random `full` model and the same weights run as `kind`."""
    torch.manual_seed(0)
    full = CausalLM(ModelArgs(**TINY, attention="full")).eval()
    other = CausalLM(ModelArgs(**TINY, attention=kind, attention_options=options)).eval()
    other.load_state_dict(full.state_dict())
    return full, other


def _ids(t: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind, options", [("h2o", {"cache_size": 200, "update_every": 32}),
                                           ("streaming", {"cache_size": 200, "sinks": 4, "update_every": 32})])
def test_cache_at_least_the_length_equals_transformers(tmp_path, kind, options):
    """A cache that never fills evicts nothing: logits equal transformers' own model (fp32, 1e-5)."""
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    ours = longcpt.from_pretrained(tmp_path, attention=kind, dtype=torch.float32, **options).eval()
    ids = _ids(150)
    with torch.no_grad():
        want = hf(ids).logits
        assert (ours(ids) - want).abs().max().item() <= 1e-5
        state: dict = {}
        got = torch.cat([ours.lm_head(h) for _, h in forward_chunks(ours, ids, state, chunk_size=37)], dim=1)
    assert (got - want).abs().max().item() <= 1e-5
    assert kv_kept(state) == 1.0


@pytest.mark.parametrize("kind, options", [("h2o", {"cache_size": 20, "recent": 4, "update_every": 16}),
                                           ("streaming", {"cache_size": 20, "sinks": 4, "update_every": 16})])
def test_any_chunking_gives_one_result(kind, options):
    """Evictions happen at absolute multiples of update_every, so the prefill chunk size does not matter."""
    _, model = _pair(kind, **options)
    ids = _ids(101, batch=1)
    with torch.no_grad():
        whole = model(ids)
        for chunk in (1, 7, 40):
            state: dict = {}
            got = torch.cat([model.lm_head(h) for _, h in forward_chunks(model, ids, state, chunk)], dim=1)
            assert (got - whole).abs().max().item() <= 1e-5, chunk
            # the last update (after 96 tokens) left 20; 5 more came after it
            assert kv_kept(state) == pytest.approx(25 / 101)


def test_streaming_keeps_sinks_and_window_with_their_positions():
    """Kept keys, values and positions are exactly those of the full cache at the kept positions."""
    full, model = _pair("streaming", cache_size=40, sinks=4, update_every=32)
    ids = _ids(100)
    with torch.no_grad():
        ref: dict = {}
        full(ids, state=ref)
        state: dict = {}
        model(ids, state=state)
    cache = state[0]
    assert isinstance(cache, EvictingCache) and bool(cache.valid.all())
    # last update at 96: sinks 0-3 and the window 60-95, then the four tokens after it
    want = list(range(4)) + list(range(60, 100))
    assert cache.pos[0, 0].tolist() == want and cache.pos[1, 1].tolist() == want
    # layer 0 keys do not depend on attention: they must be the full cache's, not re-rotated
    assert isinstance(ref[0], KVCache)
    idx = torch.tensor(want)
    assert torch.equal(cache.k, ref[0].k[:, :, : ref[0].length][:, :, idx])
    assert torch.equal(cache.v, ref[0].v[:, :, : ref[0].length][:, :, idx])


def _dense_layer0_weights(model: CausalLM, ids: torch.Tensor, queries: int) -> torch.Tensor:
    """Brute force: layer 0's causal attention weights (B, Hk, queries, queries), mean over query groups."""
    attn = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[:, :queries]))
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(torch.arange(t).expand(b, t))
    q, k = apply_rotary(q, k, cos, sin)
    g = attn.n_heads // attn.n_kv_heads
    k = k.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)) / attn.head_dim**0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    w = scores.softmax(-1)  # (B, Hq, t, t)
    return w.view(b, attn.n_kv_heads, g, t, t).mean(2)


def test_h2o_keeps_recent_and_heaviest_hitters_like_brute_force():
    cache_size, recent, every = 24, 6, 64
    _, model = _pair("h2o", cache_size=cache_size, recent=recent, update_every=every)
    ids = _ids(every)
    with torch.no_grad():
        state: dict = {}
        model(ids, state=state)
        received = _dense_layer0_weights(model, ids, every).sum(dim=2)  # (B, Hk, t): attention each key got
    received[..., -recent:] = float("inf")
    for b in range(2):
        for h in range(2):
            want = sorted(received[b, h].topk(cache_size).indices.tolist())
            assert state[0].pos[b, h].tolist() == want, (b, h)
    assert state[0].kept_fraction() == cache_size / every


def h2o_select(cache_size: int, recent: int):
    """H2O's update by brute force: a head over `cache_size` keeps its tokens of the last `recent`
    positions, then those with the most attention received since they entered (summed over queries)."""

    def select(kept, weights, last):
        new = []
        for b, row in enumerate(kept):
            new.append([])
            for h, positions in enumerate(row):
                if len(positions) <= cache_size:
                    new[-1].append(positions)
                    continue
                newest = positions[-1]
                recent_ones = [j for j in positions if j > newest - recent]
                received = {j: float(weights[b, h, : last + 1, j].sum()) for j in positions}
                heavy = sorted((j for j in positions if j not in recent_ones), key=lambda j: -received[j])
                new[-1].append(sorted(recent_ones + heavy[: cache_size - len(recent_ones)]))
        return new

    return select


def test_h2o_keeps_what_a_brute_force_h2o_keeps_over_several_updates():
    """Every layer, row and KV head after each of 5 updates: the kept positions equal a brute-force
    H2O's, whose scores carry over evictions (attention received since entry, by dense softmaxes)."""
    cache_size, recent, every = 24, 6, 16
    _, model = _pair("h2o", cache_size=cache_size, recent=recent, update_every=every)
    ids = _ids(80)
    inputs, kept, state = run_model(model, ids, every)
    for layer, (q, k, v) in inputs.items():
        want, _ = simulate(q, k, v, every, h2o_select(cache_size, recent))
        assert kept[layer] == want, layer
        assert len(want) == 5 and all(len(x) == cache_size for x in want[-1][0])
    use = cache_use(state)  # after the last update at 79: 24 slots of 80 tokens
    assert use["kv_kept"] == pytest.approx(24 / 80)
    # the slots each token saw: 1..16, 17..32, then 24 + 1..16 after each update; the largest 40
    want_mean = (sum(range(1, 33)) + 3 * sum(range(25, 41))) / (80 * 81 / 2)
    assert use["kv_kept_mean"] == pytest.approx(want_mean) and use["kv_peak"] == pytest.approx(40 / 80)


def test_cache_keep_is_exact_bookkeeping_with_ragged_heads():
    """Per-head different kept sets: left-padded, positions/keys/values/extras follow their tokens."""
    g = torch.Generator().manual_seed(0)
    cache = EvictingCache()
    k, v = torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 10, 4, generator=g)
    positions = torch.arange(100, 110)
    cache.extra["score"] = torch.zeros(2, 3, 0, 5)
    cache.append(k, v, positions)
    cache.extra["score"] = torch.randn(2, 3, 10, 5, generator=g)
    score = cache.extra["score"].clone()
    mask = torch.rand(2, 3, 10, generator=g) < 0.4
    mask[0, 1] = True  # one head keeps everything: no padding there
    cache.keep(mask.clone())
    mask[..., -1] = True  # the newest token always stays
    assert cache.length == 10
    for b in range(2):
        for h in range(3):
            slots = mask[b, h].nonzero().flatten()
            n = len(slots)
            assert cache.valid[b, h].tolist() == [False] * (10 - n) + [True] * n
            assert cache.pos[b, h, 10 - n :].tolist() == positions[slots].tolist()
            assert torch.equal(cache.k[b, h, 10 - n :], k[b, h, slots])
            assert torch.equal(cache.v[b, h, 10 - n :], v[b, h, slots])
            assert torch.equal(cache.extra["score"][b, h, 10 - n :], score[b, h, slots])
    # a row holds its longest head's entries (the others are padded to it), as the reference counts
    assert cache.kept_fraction() == pytest.approx(mask.sum(-1).amax(-1).float().mean().item() / 10)
    cache.append(k[:, :, :2], v[:, :, :2], torch.arange(110, 112))
    assert cache.pos[0, 0, -2:].tolist() == [110, 111] and cache.extra["score"][..., -2:, :].abs().sum() == 0


def test_generation_runs_through_the_eviction():
    _, model = _pair("streaming", cache_size=16, sinks=2, update_every=8)
    state: dict = {}
    out = generate(model, _ids(40), max_new_tokens=12, state=state)
    assert out.shape == (2, 12)
    # evictions after 40 and 48 tokens: 16 kept, then positions 48-50 (the last token generated is never fed)
    assert state[0].pos[0, 0].tolist() == [0, 1] + list(range(34, 51))


@pytest.mark.parametrize("kind, options, words", [
    ("h2o", {}, "cache_size=None: must be a positive integer (kind 'h2o')"),
    ("h2o", {"cache_size": 0}, "cache_size=0: must be a positive integer (kind 'h2o')"),
    ("streaming", {"cache_size": -5}, "cache_size=-5: must be a positive integer"),
    ("h2o", {"cache_size": 8, "recent": 8}, "recent=8 must be below cache_size=8"),
    ("streaming", {"cache_size": 4, "sinks": 4}, "sinks=4 must be below cache_size=4"),
])
def test_bad_options_name_the_option(tmp_path, kind, options, words):
    tiny_hf_model("llama").save_pretrained(tmp_path)
    with pytest.raises(LongcptError) as e:
        longcpt.from_pretrained(tmp_path, attention=kind, **options)
    assert words in str(e.value)
