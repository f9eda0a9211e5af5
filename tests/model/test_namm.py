"""The `namm` kind: spectrogram features, the BAM scorer's mask, eviction, the policy file."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_hf_model

import longcpt
from longcpt.errors import LongcptError
from longcpt.model import CausalLM, ModelArgs
from longcpt.model.attention.evict import EvictingCache
from longcpt.model.attention.namm import (
    NammPolicy,
    NammSpec,
    backward_attention,
    ema_update,
    load_policy,
    score_tokens,
    stft_magnitudes,
    update_features,
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


def test_ema_carried_across_updates_equals_one_pass():
    """Two updates (the second with new tokens) equal one STFT + EMA over the concatenated columns."""
    spec = NammSpec(update_every=48)
    g = torch.Generator().manual_seed(0)
    b, hk, s1, s2, n = 2, 2, 6, 9, 48
    cache = EvictingCache()
    cache.append(torch.zeros(b, hk, s1, 4), torch.zeros(b, hk, s1, 4), torch.arange(s1))
    rows1 = torch.rand(b, hk, n, s1, generator=g)
    update_features(cache, rows1, spec)
    cache.append(torch.zeros(b, hk, s2 - s1, 4), torch.zeros(b, hk, s2 - s1, 4), torch.arange(s1, s2))
    rows2 = torch.rand(b, hk, n, s2, generator=g)
    two = update_features(cache, rows2, spec)  # (B, Hk, S2, K)

    columns = torch.cat([F.pad(rows1, (0, s2 - s1)), rows2], dim=2).transpose(-1, -2)  # (B, Hk, S2, 2n)
    signal = F.pad(columns, (spec.n_fft - spec.hop, 0))
    ref = torch.stft(signal.reshape(-1, signal.shape[-1]), n_fft=32, hop_length=16, window=torch.hann_window(32),
                     center=False, return_complex=True).abs().transpose(1, 2)  # (N, 2n/hop, K)
    one = ema_update(None, ref.reshape(b, hk, s2, 2 * n // 16, 17), spec.ema, spec.hop)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
    # the frame weights: the newest frame weighs (1 - 0.99^16), older ones decay by 0.99^16 each
    a = 0.99**16
    col = torch.zeros(b, hk, s2, 6, 17)
    col[..., -1, 0] = 1.0
    torch.testing.assert_close(ema_update(None, col, 0.99, 16)[..., 0], torch.full((b, hk, s2), 1 - a))


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


def test_mlp_scorer_is_per_token():
    policy = _random_policy(NammSpec(scorer="mlp"))
    assert policy.params.numel() == 25 * 25 + 25 + 25 + 1
    feats = torch.randn(2, 2, 7, 25)
    moved = feats.clone()
    moved[..., 3, :] += 1.0
    delta = (score_tokens(moved, policy) - score_tokens(feats, policy)).abs()
    assert torch.all(delta[..., 3] > 0) and torch.all(delta[..., [0, 1, 2, 4, 5, 6]] == 0)


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
    # keep a token iff the DC part of its attention spectrogram is above the median seen by a keep-all run
    policy = NammPolicy.zeros(NammSpec(update_every=32))
    policy.weights()["out.bias"].fill_(1.0)
    model = CausalLM(ModelArgs(**TINY, attention="namm", attention_options={"policy": policy})).eval()
    model.load_state_dict(full.state_dict())
    ids = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probe: dict = {}
        model(ids, state=probe)
        policy.feature_mean[0] = probe[0].extra["namm_ema"][..., 0].median()
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

    assert "format version 2; this longcpt reads version 1" in broken("v2.pt", version=2)
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
    with pytest.raises(LongcptError, match="this is an Infini model, whose attention is its compressive memory"):
        longcpt.from_pretrained(tmp_path / "infini", attention="namm", policy=str(tmp_path / "policy.pt"))
