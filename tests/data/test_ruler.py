"""RULER task generators: exact lengths, needles once and where recorded, references, seeds, errors."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from tiny import bpe_tokenizer

from longcpt.data.ruler import (
    NEEDLE,
    NOISE_SENTENCES,
    TASKS,
    Haystack,
    RulerGenerator,
    answer_text,
    assemble,
    fit_units,
    load_haystack,
    make_ruler_examples,
    split_sentences,
    word_pool,
)
from longcpt.errors import LongcptError

NIAH = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def gen(tok):
    return RulerGenerator(tok)


def count_sublist(haystack: list[int], needle: list[int]) -> int:
    n = len(needle)
    return sum(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def test_fit_units_and_assemble_by_hand():
    assert fit_units(10, [3, 3, 3, 3]) == 3 and fit_units(2, [3]) == 0 and fit_units(6, [3, 3]) == 2
    hay = Haystack(((10, 11), (20, 21, 22)), "toy")
    # 12 tokens: head 1 + tail 1 + insert 2 = 4 fixed, 8 of haystack: units 2+3+2, then 1 token of the next.
    ids, spans = assemble(12, [1], [9], hay, [(0.5, [7, 7])])
    assert ids == [1, 10, 11, 20, 21, 22, 7, 7, 10, 11, 20, 9]
    assert spans == [(6, 8)]  # 3 whole units fit: the insert goes before unit floor(0.5 * (3 + 1)) = 2
    ids, spans = assemble(6, [1], [9], hay, [(0.0, [7]), (1.0, [8])])
    assert ids == [1, 7, 10, 11, 8, 9] and spans == [(1, 2), (4, 5)]
    with pytest.raises(LongcptError, match="take 5 tokens"):
        assemble(4, [1], [9], hay, [(0.0, [7, 7, 7])])


@pytest.mark.parametrize("task", [*NIAH, "vt"])
@pytest.mark.parametrize("extra", [0, 1, 333, 2900])
def test_niah_and_vt_prompts_have_the_exact_length(gen, task, extra):
    length = gen.min_length(task) + extra
    for index in range(3):
        sample = gen.sample(task, length, index)
        assert len(sample.input_ids) == length
        assert sample.input_ids[0] == gen.tokenizer.bos_token_id


@pytest.mark.parametrize("task", ["cwe", "fwe"])
@pytest.mark.parametrize("extra", [0, 57, 4000])
def test_word_list_prompts_are_never_longer_and_at_most_2_percent_shorter(gen, task, extra):
    length = gen.min_length(task) + extra
    for index in range(3):
        n = len(gen.sample(task, length, index).input_ids)
        assert 0.98 * length <= n <= length


@pytest.mark.parametrize("task", NIAH)
def test_needles_appear_once_where_recorded_and_references_are_the_asked_values(tok, gen, task):
    spec = TASKS[task].options
    sample = gen.sample(task, 1500, 4)
    text = tok.decode(sample.input_ids)
    needles = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text)
    assert len(needles) == spec["keys"] * spec["values"] == len(sample.inserts)
    for (start, end), (key, value) in zip(sample.inserts, needles):  # spans in prompt order
        ids = sample.input_ids[start:end]
        assert tok.decode(ids) == " " + NEEDLE.format(kind="numbers", key=key, value=value)
        assert count_sublist(sample.input_ids, ids) == 1
    question = text[text.rindex("\n") :]
    asked = [k for k, _ in needles if k in question]
    assert len(set(asked)) == spec["queries"]
    assert sorted(sample.references) == sorted(v for k, v in needles if k in asked)
    assert len(sample.references) == spec["queries"] * spec["values"]
    assert question.endswith("mentioned in the provided text " + ("is" if len(sample.references) == 1 else "are"))


def test_needle_depths_spread_over_the_haystack(gen):
    """The needle of niah_single lands anywhere from the start to the end of a long haystack."""
    starts = [gen.sample("niah_single", 3000, i).inserts[0][0] / 3000 for i in range(40)]
    assert min(starts) < 0.2 and max(starts) > 0.8


def test_vt_chain_is_in_order_and_the_references_are_its_variables(tok, gen):
    sample = gen.sample("vt", 1200, 2)
    text = tok.decode(sample.input_ids)
    statements = re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d{5})\.", text)
    assert len(statements) == len(sample.inserts) == 5
    value = re.search(r"assigned the value (\d{5}) in the text above", text).group(1)
    bound, chain = {value}, []
    for name, source in statements:  # text order: each copy comes after what it copies
        assert source in bound
        bound.add(name)
        chain.append(name)
    assert sample.references == chain
    for start, end in sample.inserts:
        assert count_sublist(sample.input_ids, sample.input_ids[start:end]) == 1


def test_cwe_references_are_the_most_common_words(tok, gen):
    for length in (gen.min_length("cwe") + 300, 4500):  # below 4K: 6 and 1 copies; from 4K: 30 and 3
        sample = gen.sample("cwe", length, 1)
        text = tok.decode(sample.input_ids)
        body = text[text.index("most often.\n") : text.index("\nQuestion:")]
        entries = re.findall(r"(\d+)\. ([a-z]+)", body)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        top = counts.most_common()
        assert sorted(sample.references) == sorted(w for w, _ in top[:10])
        assert top[9][1] > top[10][1]  # strictly more often than any other word
        assert top[0][1] == (30 if length >= 4096 else 6)


def test_fwe_references_are_the_three_most_frequent_coded_words(tok, gen):
    sample = gen.sample("fwe", 2000, 0)
    text = tok.decode(sample.input_ids)
    body = text[text.index("coded words.") + len("coded words.") : text.index("\nQuestion:")]
    counts = Counter(w for w in body.split() if w != "...")
    top = counts.most_common()
    assert sorted(sample.references) == sorted(w for w, _ in top[:3])
    assert top[2][1] > top[3][1]
    assert body.split().count("...") > top[0][1]  # the noise word is the most frequent, as in RULER


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_are_a_pure_function_of_seed_task_length_index(tok, task):
    length = RulerGenerator(tok).min_length(task) + 200
    a = RulerGenerator(tok)
    first = [a.sample(task, length, i, seed=3).input_ids for i in range(3)]
    b = RulerGenerator(tok)  # fresh caches, other samples generated first, in another order
    b.sample(task, length + 40, 0, seed=3)
    again = [b.sample(task, length, i, seed=3).input_ids for i in (2, 1, 0)][::-1]
    assert first == again
    assert a.sample(task, length, 0, seed=4).input_ids != first[0]
    assert len({tuple(x) for x in first}) == 3


def test_errors_name_the_task_and_the_minimum(gen):
    with pytest.raises(LongcptError, match=r"--tasks niah_singel: unknown task; known tasks: niah_single,"):
        gen.sample("niah_singel", 1000, 0)
    need = gen.min_length("niah_multiquery")
    with pytest.raises(LongcptError, match=rf"--lengths 100: too short for niah_multiquery .*use lengths >= {need}"):
        gen.sample("niah_multiquery", 100, 0)
    with pytest.raises(LongcptError, match=r"too short for cwe"):
        gen.sample("cwe", 150, 0)


def test_text_haystack_from_files_and_prepared_corpus(tok, tmp_path):
    from datasets import Dataset

    text = "Alpha beta gamma. " * 5 + "Delta epsilon! Zeta eta? " + "word " * 60
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    from_file = load_haystack(tmp_path / "a.jsonl", tok)
    assert [tok.decode(u) for u in from_file.units[:3]] == [" Alpha beta gamma."] * 3
    Dataset.from_dict({"input_ids": [tok.encode(text, add_special_tokens=False)]}).save_to_disk(str(tmp_path / "prep"))
    assert load_haystack(tmp_path / "prep", tok).units == from_file.units
    gen = RulerGenerator(tok, from_file)
    sample = gen.sample("niah_single", 600, 0)
    assert len(sample.input_ids) == 600 and "NOISE" not in tok.decode(sample.input_ids)
    assert "Alpha beta gamma." in tok.decode(sample.input_ids)
    assert not any(s in tok.decode(sample.input_ids) for s in NOISE_SENTENCES)
    with pytest.raises(LongcptError, match="not found"):
        load_haystack(tmp_path / "missing.jsonl", tok)


def test_split_sentences_cuts_long_runs():
    assert split_sentences("One two.  Three\nfour!  Five") == ["One two.", "Three four!", "Five"]
    pieces = split_sentences("x " * 100)
    assert len(pieces) == 5 and all(len(p.split()) <= 24 for p in pieces)


def test_word_pool_is_distinct_and_grows_past_the_built_in_words():
    pool = word_pool(3000)
    assert len(set(pool)) == 3000 and pool[:3] == word_pool(5)[:3]


def test_training_rows_carry_prompt_and_answer(tok):
    rows = list(make_ruler_examples(tok, ["niah_multivalue", "vt"], [700], 2, seed=9))
    assert [r["id"] for r in rows] == ["niah_multivalue-700-0", "niah_multivalue-700-1", "vt-700-0", "vt-700-1"]
    for row in rows:
        assert row["text"] == row["prompt"] + row["answer"]
        assert all(ref in row["answer"] for ref in row["references"])
        assert len(row["input_ids"]) == 700
    assert answer_text("niah_single", ["1234567"]) == " 1234567."
    assert answer_text("cwe", ["a", "b"]) == " 1. a 2. b"
