"""Passkey prompts: exact token lengths, needle depth, keys, answer-only labels (vs transformers' loss)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import bpe_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from longcpt.data.collate import Collator
from longcpt.data.passkey import (
    FILLER_SENTENCES,
    NEEDLE,
    QUESTION,
    TASK,
    PasskeyPromptBuilder,
    make_passkey_examples,
    passkey_key,
    read_passkey_pairs,
)
from longcpt.data.task import answer_only_row
from longcpt.errors import LongcptError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.mark.parametrize("extra", [1, 37, 700, 3001])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_prompt_has_exact_length_and_needle_at_depth(tok, extra, depth):
    builder = PasskeyPromptBuilder(tok)
    length = builder.min_length + extra
    ex = builder.build(length, depth, key=48213)
    assert len(ex.input_ids) == length
    assert ex.input_ids[0] == tok.bos_token_id
    # The needle's tokens sit at needle_start, and decode to the needle sentence.
    needle = tok.encode("\n" + NEEDLE.format(key=48213) + "\n", add_special_tokens=False)
    assert ex.input_ids[ex.needle_start : ex.needle_start + len(needle)] == needle
    # Depth measured independently: filler tokens before the needle over all filler tokens.
    head = len(tok.encode(TASK + "\n", add_special_tokens=False)) + 1
    tail = len(tok.encode("\n" + QUESTION, add_special_tokens=False))
    n_filler = length - head - len(needle) - tail
    before = ex.needle_start - head
    longest_sentence = max(len(tok.encode(" " + s, add_special_tokens=False)) for s in FILLER_SENTENCES)
    assert 0 <= depth * n_filler - before < longest_sentence + 1e-6
    if depth == 0.0:
        assert ex.needle_start == head  # right after the instruction
    if depth == 1.0:
        assert ex.needle_start + len(needle) == length - tail  # right before the question


def test_prompt_text_reads_like_landmark(tok):
    ex = PasskeyPromptBuilder(tok).build(400, 0.5, key=31337)
    text = tok.decode(ex.input_ids, skip_special_tokens=True)
    assert text.startswith(TASK + "\n")
    assert text.endswith("\n" + QUESTION)
    assert text.count("31337") == 2
    assert "The grass is green. The sky is blue." in text
    # The needle sits in the middle of the text too (measured in characters).
    middle = text.index("The pass key is 31337") / len(text)
    assert 0.35 < middle < 0.65
    assert tok.decode(ex.answer_ids) == " 31337"


def test_too_short_length_names_the_minimum(tok):
    builder = PasskeyPromptBuilder(tok)
    for key in (12345, 99999, 40404):
        need = builder.fixed_tokens(key)
        assert need <= builder.min_length
        shortest = builder.build(need, 0.5, key)
        assert len(shortest.input_ids) == need
        assert NEEDLE.format(key=key) in tok.decode(shortest.input_ids)  # the needle survives at the minimum
        with pytest.raises(LongcptError, match=r"use lengths >= \d+") as err:
            builder.build(need - 1, 0.5, key)
        assert int(str(err.value).rsplit(">= ", 1)[1].rstrip(")")) >= need


def test_tokenizer_without_bos(tok):
    no_bos = bpe_tokenizer(bos=False)
    ex = PasskeyPromptBuilder(no_bos).build(300, 0.3, key=12345)
    assert len(ex.input_ids) == 300 and no_bos.bos_token_id not in ex.input_ids
    assert no_bos.decode(ex.input_ids).count(NEEDLE.format(key=12345)) == 1


def test_keys_are_random_per_trial_and_fixed_by_seed(tok):
    rows = list(make_passkey_examples(tok, [200, 300], [0.0, 1.0], n=5, seed=7))
    assert len(rows) == 20
    keys = [r["key"] for r in rows]
    assert len(set(keys)) >= 18  # 5-digit keys drawn independently
    assert all(10000 <= k <= 99999 for k in keys)
    again = list(make_passkey_examples(tok, [300], [1.0], n=5, seed=7))
    assert [r["key"] for r in again] == keys[-5:]  # a smaller sweep keeps the same keys
    other = list(make_passkey_examples(tok, [300], [1.0], n=5, seed=8))
    assert [r["key"] for r in other] != keys[-5:]
    assert passkey_key(7, 300, 1.0, 4) == keys[-1]


def test_random_depths_spread_over_the_filler(tok):
    rows = list(make_passkey_examples(tok, [500], ["random"], n=40, seed=0))
    depths = [r["needle_depth"] for r in rows]
    assert min(depths) < 0.2 and max(depths) > 0.8


def test_labels_fall_on_the_answer_only(tok):
    ex = PasskeyPromptBuilder(tok).build(150, 0.5, key=24680)
    target = ex.answer_ids + [tok.eos_token_id]
    row = answer_only_row(ex.input_ids, target, seq_len=170, pad_id=tok.pad_token_id)
    tokens, labels = row["input_ids"], row["labels"]
    supervised = [t for t, y in enumerate(labels) if y != -100]
    assert supervised == list(range(149, 149 + len(target)))
    assert [labels[t] for t in supervised] == target
    assert all(labels[t] == tokens[t + 1] for t in supervised)
    assert row["doc_lens"] == [150 + len(target), 170 - 150 - len(target)]


def test_answer_only_loss_equals_transformers_masked_loss(tok):
    """Our aligned labels + CausalLM.loss give transformers' loss with the prompt masked out."""
    from longcpt.model import from_pretrained

    builder = PasskeyPromptBuilder(tok)
    rows = []
    for key, depth in ((11111, 0.0), (54321, 1.0)):
        ex = builder.build(100, depth, key)
        rows.append(answer_only_row(ex.input_ids, ex.answer_ids + [tok.eos_token_id], 110, tok.pad_token_id))
    batch = Collator("full")(rows)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    hf_labels = batch["input_ids"].clone()  # transformers shifts labels itself
    hf_labels[:, :100] = -100  # the prompt (and the BOS) are not targets
    hf_labels[batch["input_ids"] == tok.pad_token_id] = -100
    with torch.no_grad():
        expected = hf(batch["input_ids"], labels=hf_labels).loss
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = from_pretrained(d).eval()
        got = ours.loss(batch["input_ids"], batch["labels"], batch["position_ids"], batch["cu_seqlens"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_train_on_input_labels_every_next_token_but_the_padding():
    row = answer_only_row([1, 5, 6], [7, 2], 8, 0, train_on_input=True)
    assert row["labels"] == [5, 6, 7, 2, -100, -100, -100, -100]
    assert row["input_ids"] == [1, 5, 6, 7, 2, 0, 0, 0] and row["doc_lens"] == [5, 3]
    assert answer_only_row([1, 5, 6], [7, 2], 8, 0)["labels"] == [-100, -100, 7, 2, -100, -100, -100, -100]


def test_rows_go_through_the_packed_data_collator():
    rows = [answer_only_row([1, 5, 6], [7, 2], 8, 0), answer_only_row([1, 5, 6, 9, 9, 9], [7, 2], 8, 0)]
    full = Collator("full")(rows)
    assert full["cu_seqlens"].tolist() == [0, 5, 8, 16]
    assert full["position_ids"].tolist() == [list(range(8))] * 2
    assert full["labels"][0].tolist() == [-100, -100, 7, 2, -100, -100, -100, -100]
    anchor = Collator("anchor")(rows)
    assert anchor["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 4]  # the example is position-exact


def test_read_pairs_checks_rows_and_lengths(tmp_path, tok):
    good = {"input_ids": [1, 4, 5], "answer_ids": [6]}
    f = tmp_path / "pk.jsonl"
    f.write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(LongcptError, match=r"pk.jsonl:2: not a passkey row"):
        read_passkey_pairs(str(f), 16, eos_id=2)
    f.write_text(json.dumps(good) + "\n")
    assert read_passkey_pairs(str(f), 16, eos_id=2) == [([1, 4, 5], [6, 2])]
    with pytest.raises(LongcptError, match=r"pk.jsonl:1: example of 5 tokens .* data.seq_len=4"):
        read_passkey_pairs(str(f), 4, eos_id=2)


def test_make_passkey_script(tmp_path, tok, run_script):
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "pk.jsonl"
    cmd = [REPO / "data_prep/make_passkey.py", "--tokenizer", tmp_path / "tok",
           "--lengths", "200,300", "--depths", "0,0.5,random", "--n", "2", "--output", out]
    ok = run_script(*cmd)
    assert ok.returncode == 0, ok.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    assert sorted({len(r["input_ids"]) for r in rows}) == [200, 300]
    bad = run_script(*cmd[:-4], "--depths", "1.5", "--n", "2", "--output", out)
    assert bad.returncode != 0 and "depth 1.5: must be in [0, 1]" in bad.stderr


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_split_digits_writes_one_token_per_digit(tok, depth):
    """--split-digits: needle and answer carry the key digit by digit; the prompt text is the same."""
    split = PasskeyPromptBuilder(tok, split_digits=True)
    key = 90817
    ex = split.build(split.min_length + 200, depth, key)
    assert len(ex.input_ids) == split.min_length + 200
    digits = [tok.decode([t]) for t in ex.answer_ids]
    assert digits == [" 9", "0", "8", "1", "7"] or digits == [" ", "9", "0", "8", "1", "7"]
    assert tok.decode(ex.answer_ids) == " 90817"
    needle_text = tok.decode(ex.input_ids[ex.needle_start :])
    assert needle_text.startswith("\n" + NEEDLE.format(key=key) + "\n")
    # The key's digit tokens appear twice in the needle and the answer is copyable from it.
    n = len(ex.answer_ids)
    hits = [i for i in range(len(ex.input_ids) - n + 1) if ex.input_ids[i : i + n] == ex.answer_ids]
    assert len(hits) == 2 and all(ex.needle_start <= i < ex.needle_start + 40 for i in hits)
    assert tok.decode(ex.input_ids).endswith("\n" + QUESTION)


def test_split_digits_rows_and_script(tmp_path, tok, run_script):
    rows = list(make_passkey_examples(tok, [150], [0.5], n=3, seed=2, split_digits=True))
    for r in rows:
        assert len(r["input_ids"]) == 150 and r["answer"] == f" {r['key']}"
        assert len(r["answer_ids"]) >= 5  # one token per digit (the first may carry its space)
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "pk.jsonl"
    run = run_script(REPO / "data_prep/make_passkey.py", "--tokenizer", tmp_path / "tok", "--lengths", "150",
                     "--depths", "0.5", "--n", "3", "--seed", "2", "--split-digits", "--output", out)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["answer_ids"] for line in out.read_text().splitlines()] == [r["answer_ids"] for r in rows]


def test_filler_offset_starts_the_cycle_at_another_sentence(tok):
    """Another offset: the same needle, key and length, other filler tokens around it (unseen filler)."""
    plain, shifted = PasskeyPromptBuilder(tok), PasskeyPromptBuilder(tok, filler_offset=2)
    a, b = plain.build(plain.min_length + 60, 0.5, 12345), shifted.build(plain.min_length + 60, 0.5, 12345)
    assert len(a.input_ids) == len(b.input_ids) and a.input_ids != b.input_ids
    first = len(plain.bos) + len(plain.head)
    assert b.input_ids[first : first + len(shifted.units[2])] == shifted.units[2]  # "The sun is yellow."
    needle = plain.needle_length(12345)
    assert a.input_ids[a.needle_start : a.needle_start + needle] == b.input_ids[b.needle_start : b.needle_start + needle]
