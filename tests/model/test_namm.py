"""The `namm` kind: spectrogram features folded as attention runs, the reference's BAM scorer and
selection rule, eviction over several updates against an independent brute-force NAMM, the policy file."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from eviction_reference import run_model, simulate
from tiny import tiny_hf_model

import longcpt
from longcpt.errors import LongcptError
from longcpt.model import CausalLM, ModelArgs
from longcpt.model.attention.evict import EvictingCache
from longcpt.model.attention.namm import (
    EMA,
    PARTIAL,
    TAIL,
    NammPolicy,
    NammSpec,
    backward_attention,
    fold_attention,
    keep_mask,
    load_policy,
    score_tokens,
    stft_magnitudes,
)
from longcpt.model.generation import forward_chunks, kv_kept

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def _random_policy(spec: NammSpec, seed: int = 0, scale: float = 0.5) -> NammPolicy:
    policy = NammPolicy.zeros(spec)
    policy.params.normal_(0.0, scale, generator=torch.Generator().manual_seed(seed))
    return policy


def test_stft_features_equal_torch_stft():
    g = torch.Generator().manual_seed(0)
    columns = torch.rand(3, 2, 5, 16 + 64, generator=g)  # (B, Hk, S, carry + n)
    ours = stft_magnitudes(columns, 32, 16)  # (B, Hk, S, F, K)
    ref = torch.stft(columns.reshape(-1, 80), n_fft=32, hop_length=16, window=torch.hann_window(32), center=False,
                     return_complex=True).abs()  # (N, K, F)
    assert ours.shape == (3, 2, 5, 4, 17)
    torch.testing.assert_close(ours.reshape(-1, 4, 17), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def reference_ema(column: torch.Tensor, spec: NammSpec) -> torch.Tensor:
    """EMA spectrogram (K,) of one token's whole attention column (queries since the stream's start,
    zeros before the token existed): torch.stft over n_fft - hop zeros then the column, folded frame
    by frame with e <- a e + (1 - a) |X_f|, a = ema^hop."""
    signal = torch.cat([column.new_zeros(spec.n_fft - spec.hop), column])
    frames = torch.stft(signal, n_fft=spec.n_fft, hop_length=spec.hop, window=torch.hann_window(spec.n_fft,
                        dtype=signal.dtype), center=False, return_complex=True).abs().T  # (F, K)
    frames = frames[: column.shape[0] // spec.hop]  # the frames that ended at a query
    a, e = spec.ema**spec.hop, torch.zeros(spec.frequencies, dtype=signal.dtype)
    for x in frames:
        e = a * e + (1 - a) * x
    return e


@pytest.mark.parametrize("n_fft,hop", [(32, 16), (16, 6)])
def test_attention_folded_in_blocks_of_any_size_equals_one_stft_and_ema(n_fft, hop):
    """Blocks of 5, 11, 16, 29, 3, 32 queries, tokens entering between them: every token's EMA equals a
    per-frame EMA over torch.stft of its whole column, and the policy holds no row of attention."""
    spec = NammSpec(n_fft=n_fft, hop=hop, update_every=96)
    g = torch.Generator().manual_seed(0)
    b, hk, t_total = 2, 2, 96
    cache, columns = EvictingCache(), torch.zeros(b, hk, t_total, t_total, dtype=torch.float64)  # (B, Hk, q, key)
    at = 0
    for t in (5, 11, 16, 29, 3, 32):
        new = 1 + (t % 3)  # tokens entering with this block
        cache.append(torch.zeros(b, hk, new, 4), torch.zeros(b, hk, new, 4), torch.arange(cache.length, cache.length + new))
        rows = torch.rand(b, hk, t, cache.length, generator=g)  # (B, Hk, t, S)
        columns[:, :, at : at + t, : cache.length] = rows.double()
        fold_attention(cache, rows, spec)
        at += t
        # per token only the EMA and the last frame's tail; rows only of the frame being filled
        assert set(cache.extra) == {EMA, TAIL} and cache.extra[TAIL].shape[-1] == spec.n_fft - spec.hop
        assert sum(p.shape[2] for p in cache.scratch[PARTIAL]) == at % spec.hop
    for bi in range(b):
        for h in range(hk):
            for j in range(cache.length):
                want = reference_ema(columns[bi, h, :, j], spec).float()
                torch.testing.assert_close(cache.extra[EMA][bi, h, j], want, rtol=1e-5, atol=1e-6)


def test_bam_backward_mask_never_lets_a_token_see_an_older_one():
    spec = NammSpec()
    w = _random_policy(spec).weights()
    x = torch.randn(3, 12, spec.features, requires_grad=True)
    y = backward_attention(x, w)  # (N, S, E)
    for i in range(12):
        (grad,) = torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)
        seen = grad.abs().sum(dim=(0, 2)) > 0  # (S,)
        assert not seen[:i].any(), i  # older tokens: no influence at all
        assert seen[i:].all(), i  # itself and every newer token: some
    # perturbing the oldest token moves only its own score
    policy = _random_policy(spec)
    feats = torch.randn(1, 1, 12, spec.features)
    moved = feats.clone()
    moved[..., 0, :] += 1.0
    delta = (score_tokens(moved, policy) - score_tokens(feats, policy)).abs()[0, 0]
    assert delta[0] > 0 and torch.all(delta[1:] == 0)


def reference_bam_scores(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's `GeneralizedScoring` with one StatelessAttention (backward mask, residual and
    mult) and a depth-1 MLP, written out per token: scores (S,) of x (S, E)."""
    s, e = x.shape
    h = w["qkv.weight"].shape[0] // 3
    qkv = x @ w["qkv.weight"].T + w["qkv.bias"]
    q, k, v = qkv[:, :h], qkv[:, h : 2 * h], qkv[:, 2 * h :]
    out = []
    for i in range(s):
        logits = torch.stack([q[i] @ k[j] for j in range(i, s)]) / h**0.5  # token i sees itself and newer ones
        y = (torch.softmax(logits, 0)[:, None] * v[i:]).sum(0)
        o = w["o.weight"] @ y + w["o.bias"]  # (2E,): [residual | multiplier]
        gated = x[i] * (1 + o[e:]) + o[:e]
        out.append(gated @ w["out.weight"] + w["out.bias"][0])
    return torch.stack(out)


def test_bam_scorer_is_the_references_with_its_parameter_count():
    spec = NammSpec()
    assert spec.features == 25 and spec.param_count() == 25 * 96 + 96 + 32 * 50 + 50 + 25 + 1 == 4172
    policy = _random_policy(spec, seed=3)
    feats = torch.randn(2, 3, 9, spec.features, generator=torch.Generator().manual_seed(4))
    got = score_tokens(feats, policy)  # (B, Hk, S)
    w = policy.weights()
    for bi in range(2):
        for h in range(3):
            torch.testing.assert_close(got[bi, h], reference_bam_scores(feats[bi, h], w), rtol=1e-4, atol=1e-5)


def test_mlp_scorer_is_per_token():
    """The project's own `mlp` scorer: x + relu(W1 x + b1), then a linear read-out, token by token."""
    policy = _random_policy(NammSpec(scorer="mlp"))
    assert policy.params.numel() == 25 * 25 + 25 + 25 + 1
    feats = torch.randn(2, 2, 7, 25)
    moved = feats.clone()
    moved[..., 3, :] += 1.0
    delta = (score_tokens(moved, policy) - score_tokens(feats, policy)).abs()
    assert torch.all(delta[..., 3] > 0) and torch.all(delta[..., [0, 1, 2, 4, 5, 6]] == 0)


def test_reference_selection_keeps_the_same_count_in_every_head():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, 12, generator=g)
    valid = torch.ones(3, 4, 12, dtype=torch.bool)
    valid[1, :, :3] = False  # a row with left padding
    scores[2] -= 5.0  # a row where (almost) nothing scores >= 0
    got = keep_mask(scores, valid, "reference")
    for b in range(3):
        masked = [[scores[b, h, j].item() if valid[b, h, j] else -math.inf for j in range(12)] for h in range(4)]
        for row in masked:
            row[-1] = math.inf  # the newest token always counts as kept
        k = max(sum(x >= 0 for x in row) for row in masked)
        for h in range(4):
            best = sorted(range(12), key=lambda j: -masked[h][j])[:k]
            assert got[b, h].nonzero().flatten().tolist() == sorted(best), (b, h)
    assert torch.equal(keep_mask(scores, valid, "per_head")[..., :-1], (scores >= 0)[..., :-1] & valid[..., :-1])


def namm_select(policy: NammPolicy):
    """The reference's NAMM update, by brute force: features of every kept token from its whole
    attention column (`reference_ema`), its age and the fixed normalisation; the reference BAM
    (`reference_bam_scores`); then the reference selection (K = most scores >= 0 over the row's heads,
    each head its K best; the newest token always counts)."""
    spec = policy.spec
    w = {name: t.double() for name, t in policy.weights().items()}
    half = spec.recency_dim // 2
    freqs = [1 / spec.recency_max_freq ** (i / half) for i in range(half)]
    mean, std = policy.feature_mean.double(), policy.feature_std.double()

    def select(kept, weights, last):
        new = []
        for b, row in enumerate(kept):
            scores = []
            for h, positions in enumerate(row):
                feats = []
                for j in positions:
                    age = positions[-1] - j
                    recency = [math.sin(age * f) for f in freqs] + [math.cos(age * f) for f in freqs]
                    spectral = (reference_ema(weights[b, h, : last + 1, j], spec) - mean) / std
                    feats.append(torch.cat([torch.tensor(recency, dtype=torch.float64), spectral]))
                score = reference_bam_scores(torch.stack(feats), w)
                score[-1] = math.inf
                scores.append(score)
            k = max(int((score >= 0).sum()) for score in scores)
            new.append([sorted(positions[i] for i in score.argsort(descending=True)[:k].tolist())
                         for positions, score in zip(row, scores)])
        return new

    return select


def _sharp_pair(kind_options: dict, layers: int = 2) -> tuple[CausalLM, CausalLM]:
    """A random full model with sharp attention (heads then differ) and the same weights as `namm`."""
    torch.manual_seed(0)
    args = {**TINY, "num_hidden_layers": layers}
    full = CausalLM(ModelArgs(**args, attention="full")).eval()
    with torch.no_grad():
        for block in full.model.layers:
            block.self_attn.q_proj.weight.mul_(30.0)
            block.self_attn.k_proj.weight.mul_(30.0)
    model = CausalLM(ModelArgs(**args, attention="namm", attention_options=kind_options)).eval()
    model.load_state_dict(full.state_dict())
    return full, model


def test_namm_keeps_the_tokens_a_brute_force_namm_keeps_over_several_updates():
    """Every layer, row and KV head after each of 3 updates: the positions kept equal those of an
    independent brute-force NAMM (whole attention columns, torch.stft, per-frame EMA, the reference's
    BAM and selection) replayed on the same layer inputs; a wrong feature (e.g. the normalisation's
    sign), scorer, age or selection keeps other tokens."""
    spec = NammSpec(update_every=32)
    policy = _random_policy(spec, seed=5, scale=0.3)
    g = torch.Generator().manual_seed(6)
    policy.feature_mean.copy_(torch.rand(spec.frequencies, generator=g) * 0.02)
    policy.feature_std.copy_(torch.rand(spec.frequencies, generator=g) * 0.02 + 0.005)
    policy.weights()["out.bias"].fill_(0.3)
    _, model = _sharp_pair({"policy": policy})
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))
    inputs, kept, state = run_model(model, ids, 32)
    shares = []
    for layer, (q, k, v) in inputs.items():
        want, _ = simulate(q, k, v, 32, namm_select(policy))
        assert kept[layer] == want, layer
        shares += [len(x) / (32 * (u + 1)) for u, update in enumerate(want) for row in update for x in row]
    assert 0.2 < min(shares) and max(shares) < 0.95  # the policy evicts, and not everything
    assert kv_kept(state) < 0.9


@pytest.mark.parametrize("scorer", ["bam", "mlp"])
def test_all_positive_scores_give_full_attention_logits(tmp_path, scorer):
    """A policy that scores every token > 0 keeps everything: logits equal transformers' (fp32, 1e-5)."""
    policy = _random_policy(NammSpec(scorer=scorer, update_every=32), scale=0.0)
    policy.weights()["out.bias"].fill_(1.0)
    tiny_hf_model("llama").save_pretrained(tmp_path)
    policy.save(tmp_path / "policy.pt")
    hf = tiny_hf_model("llama")
    ours = longcpt.from_pretrained(tmp_path, attention="namm", policy=str(tmp_path / "policy.pt"),
                                   dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
        state: dict = {}
        got = torch.cat([ours.lm_head(h) for _, h in forward_chunks(ours, ids, state, 50)], dim=1)
    assert (got - want).abs().max().item() <= 1e-5
    assert kv_kept(state) == 1.0


def test_eviction_keeps_exact_keys_values_and_positions():
    """Ragged per-head evictions: every kept key/value is the full cache's at its original position."""
    torch.manual_seed(0)
    full = CausalLM(ModelArgs(**TINY, attention="full")).eval()
    with torch.no_grad():  # sharp attention, so that heads differ (a fresh init attends almost uniformly)
        for block in full.model.layers:
            block.self_attn.q_proj.weight.mul_(30.0)
            block.self_attn.k_proj.weight.mul_(30.0)
    # keep a token iff the DC part of its attention spectrogram is above the median seen by a keep-all
    # run, each head on its own (per-head selection: ragged heads)
    policy = NammPolicy.zeros(NammSpec(update_every=32, selection="per_head"))
    policy.weights()["out.bias"].fill_(1.0)
    model = CausalLM(ModelArgs(**TINY, attention="namm", attention_options={"policy": policy})).eval()
    model.load_state_dict(full.state_dict())
    ids = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probe: dict = {}
        model(ids, state=probe)
        policy.feature_mean[0] = probe[0].extra[EMA][..., 0].median()
        policy.weights()["out.bias"].fill_(0.0)
        policy.weights()["out.weight"][policy.spec.recency_dim] = 1.0
        ref: dict = {}
        full(ids, state=ref)
        state: dict = {}
        whole = model(ids, state=state)
        chunked = torch.cat([model.lm_head(h) for _, h in forward_chunks(model, ids, {}, 7)], dim=1)
    assert (chunked - whole).abs().max().item() <= 1e-5
    cache, ref_k, ref_v = state[0], ref[0].k[:, :, :100], ref[0].v[:, :, :100]
    counts = cache.valid.sum(-1)
    assert 0.1 < kv_kept(state) < 0.95 and counts.min() < counts.max()  # something evicted, heads differ
    for b in range(2):
        for h in range(2):
            pos = cache.pos[b, h][cache.valid[b, h]]
            assert pos.tolist() == sorted(set(pos.tolist())) and pos[-1] == 99
            assert list(range(96, 100)) == pos[-4:].tolist()  # tokens after the last update are all there
            assert torch.equal(cache.k[b, h][cache.valid[b, h]], ref_k[b, h, pos])  # not re-rotated
            assert torch.equal(cache.v[b, h][cache.valid[b, h]], ref_v[b, h, pos])


def test_policy_file_round_trip_and_errors(tmp_path):
    policy = _random_policy(NammSpec(scorer="mlp", update_every=64))
    policy.info["generation"] = 3
    path = policy.save(tmp_path / "policy.pt")
    back = load_policy(path)
    assert back.spec == policy.spec and torch.equal(back.params, policy.params) and back.info == {"generation": 3}

    def broken(name: str, **changes) -> str:
        data = {**policy.to_dict(), **changes}
        torch.save(data, tmp_path / name)
        with pytest.raises(LongcptError) as e:
            load_policy(tmp_path / name)
        return str(e.value)

    assert "format version 3; this longcpt reads version 2" in broken("v3.pt", version=3)
    assert "version 1 policies had a residual-only BAM" in broken("v1.pt", version=1)
    assert "params has shape (10,), but a 'mlp' scorer with these settings has 676 parameters" in broken(
        "shape.pt", params=torch.zeros(10))
    spec = dataclasses.asdict(policy.spec) | {"update_every": 40}
    assert "update_every=40: must be a multiple of hop=16" in broken("every.pt", spec=spec)
    assert "not a NAMM policy file" in broken("other.pt", format="something")
    (tmp_path / "junk.pt").write_text("not a pickle")
    with pytest.raises(LongcptError, match="junk.pt: not readable as a NAMM policy file"):
        load_policy(tmp_path / "junk.pt")


def test_from_pretrained_names_a_missing_or_absent_policy(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path)
    with pytest.raises(LongcptError, match=r"policy='.*nope.pt': no such file \(train one with `longcpt namm train"):
        longcpt.from_pretrained(tmp_path, attention="namm", policy=str(tmp_path / "nope.pt"))
    with pytest.raises(LongcptError, match="policy=None: must be the path of a NAMM policy file"):
        longcpt.from_pretrained(tmp_path, attention="namm")


def test_namm_on_an_infini_model_is_refused_with_the_reason(tmp_path):
    args = ModelArgs(**TINY, attention="infini", attention_options={"segment_len": 16})
    longcpt.save_pretrained(CausalLM(args), tmp_path / "infini")
    NammPolicy.zeros(NammSpec()).save(tmp_path / "policy.pt")
    with pytest.raises(LongcptError, match="replaces softmax attention over a KV cache, but this is an 'infini' model, whose attention is its own"):
        longcpt.from_pretrained(tmp_path / "infini", attention="namm", policy=str(tmp_path / "policy.pt"))
