"""Generation with a KV cache: equal to transformers' `generate` and to one uncached forward."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from transformers.generation.logits_process import TopPLogitsWarper

from longcpt.model import from_pretrained
from longcpt.model.attention.full import offset_causal_mask
from longcpt.model.generation import forward_chunks, generate, sample_next


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same random tiny Llama in transformers and in longcpt."""
    hf = tiny_llama(vocab_size=97, seed=1)
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    return hf, from_pretrained(path).eval()


def test_offset_mask_equals_rows_of_the_full_causal_mask():
    full = torch.ones(7, 7).tril().bool()  # dense reference: query i sees keys <= i
    for t_q in range(1, 8):
        assert torch.equal(offset_causal_mask(t_q, 7), full[7 - t_q :])


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_forward_with_cache_equals_one_forward(pair, chunk):
    _, ours = pair
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ours.hidden_states(ids)  # no state: the training path
        state: dict = {}
        pieces = [h for _, h in forward_chunks(ours, ids, state, chunk_size=chunk)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, rtol=1e-5, atol=1e-5)
    assert state[0].length == 40  # layer 0 cached every position


@pytest.mark.parametrize("prefill_chunk", [7, 4096])
def test_greedy_equals_transformers_generate(pair, prefill_chunk):
    hf, ours = pair
    ids = torch.randint(3, 97, (2, 23), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = generate(ours, ids, max_new_tokens=30, prefill_chunk=prefill_chunk)
    assert got.shape == (2, 30)
    assert torch.equal(got, expected)
    assert len(set(got[0].tolist())) > 3  # a real continuation, not one repeated token


def test_eos_stops_generation_like_transformers(pair):
    hf, ours = pair
    ids = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(3))
    free = generate(ours, ids, max_new_tokens=12)[0].tolist()
    eos = free[4]  # declare the 5th generated token the end of sequence
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)[0, 11:].tolist()
    got = generate(ours, ids, max_new_tokens=12, eos_id=eos)[0].tolist()
    assert got == expected == free[: free.index(eos) + 1]


def test_finished_rows_are_filled_with_eos(pair):
    _, ours = pair
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    free = generate(ours, ids, max_new_tokens=10)
    eos = int(free[0, 2])
    got = generate(ours, ids, max_new_tokens=10, eos_id=eos)
    first = got[0].tolist().index(eos)
    assert all(t == eos for t in got[0, first:].tolist())


def test_top_p_keeps_the_same_tokens_as_transformers():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5)) * 3
    for top_p in (0.3, 0.8, 0.95):
        warped = TopPLogitsWarper(top_p)(None, logits.clone())
        kept_hf = torch.isfinite(warped)
        for seed in range(30):
            token = sample_next(logits, 1.0, top_p, torch.Generator().manual_seed(seed))
            assert kept_hf[torch.arange(4), token].all()
        # every token transformers keeps can be drawn by us: sample many times
        draws = torch.stack([sample_next(logits, 1.0, top_p, torch.Generator().manual_seed(s)) for s in range(400)])
        for row in range(4):
            assert set(draws[:, row].tolist()) <= set(kept_hf[row].nonzero().flatten().tolist())
            if kept_hf[row].sum() <= 3:
                assert set(draws[:, row].tolist()) == set(kept_hf[row].nonzero().flatten().tolist())


def test_sampling_is_reproducible_from_the_generator(pair):
    _, ours = pair
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(6))
    a = generate(ours, ids, 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = generate(ours, ids, 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    greedy = generate(ours, ids, 15)
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy)


def _infini_available() -> bool:
    from longcpt.model.attention import KINDS

    return "infini" in KINDS


@pytest.mark.skipif(not _infini_available(), reason="the infini attention kind is not in this build")
def test_infini_streams_through_the_same_calls(tmp_path):
    """Infini: chunked streaming equals one forward, and cached greedy equals re-running the prefix."""
    hf = tiny_llama(vocab_size=97, seed=1)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, attention="infini", segment_len=16).eval()
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.hidden_states(ids)  # one call: segments handled inside the core
        for chunk in (5, 16, 33):  # chunk edges inside and across segments
            got = torch.cat([h for _, h in forward_chunks(model, ids, {}, chunk_size=chunk)], dim=1)
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        seq = ids
        for _ in range(12):  # no state: the whole sequence again at every step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, ids, 12, prefill_chunk=20), seq[:, 70:])
