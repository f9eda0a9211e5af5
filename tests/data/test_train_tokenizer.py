"""train_tokenizer / load_tokenizer: a folder plain transformers loads, with BOS/EOS/PAD."""

import inspect
import json
from pathlib import Path

import pytest

from longcpt.data.tokenizer import load_tokenizer, train_tokenizer
from longcpt.errors import LongcptError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text: a few standard-library modules, one record each, plus one bad record."""
    import json as json_module
    import textwrap

    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    with open(path, "w") as f:
        for m in (json_module, textwrap, inspect):
            f.write(json.dumps({"text": Path(inspect.getfile(m)).read_text()}) + "\n")
        f.write("{broken\n")
    return path


def test_trained_folder_loads_with_plain_transformers(corpus, tmp_path):
    from transformers import AutoTokenizer

    info = train_tokenizer([corpus], 400, tmp_path / "tok")
    assert info["records"] == 3 and info["rejected"] == 1
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == 400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ 数据\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and 2 not in ids  # BOS first, like Llama's tokenizer; no EOS
    assert tok.decode(ids[1:]) == text  # byte-level: lossless
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]


def test_split_digits_makes_every_digit_a_token(corpus, tmp_path):
    from transformers import AutoTokenizer

    numbers = tmp_path / "numbers.jsonl"  # numbers frequent enough for the default to merge digits
    numbers.write_text(json.dumps({"text": "x = 1000000, year 2024; " * 300}) + "\n")
    train_tokenizer([corpus, numbers], 400, tmp_path / "tok", split_digits=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "key 2024 is 90817, x = 1000000"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2024" "90817" "1000000")
    assert tok.decode(ids) == text
    train_tokenizer([corpus, numbers], 400, tmp_path / "merged")  # the default merges digits
    merged = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert len(merged(text, add_special_tokens=False)["input_ids"]) < len(ids)


def test_vocab_too_small_and_missing_input_are_errors(corpus, tmp_path):
    with pytest.raises(LongcptError, match="--vocab-size 100"):
        train_tokenizer([corpus], 100, tmp_path / "tok")
    with pytest.raises(LongcptError, match="nope.jsonl"):
        train_tokenizer([tmp_path / "nope.jsonl"], 300, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_load_tokenizer_missing_folder_names_it(tmp_path):
    with pytest.raises(LongcptError, match="no_tok"):
        load_tokenizer(tmp_path / "no_tok")


def test_load_tokenizer_fills_missing_pad_and_bos_from_eos(corpus, tmp_path):
    train_tokenizer([corpus], 300, tmp_path / "tok")
    cfg_path = tmp_path / "tok" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("bos_token", "pad_token"):  # like a Qwen2 folder: EOS only
        cfg.pop(key)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.warns(UserWarning, match="no bos_token"):
        tok = load_tokenizer(tmp_path / "tok")
    assert tok.eos_token_id == 2 and tok.bos_token_id == 2 and tok.pad_token_id == 2


def test_cli_script(corpus, tmp_path, run_script):
    script = REPO / "data_prep" / "train_tokenizer.py"
    ok = run_script(script, "--input", corpus, "--vocab-size", "300", "--output", tmp_path / "tok")
    assert ok.returncode == 0, ok.stderr
    assert "300 tokens" in ok.stdout and (tmp_path / "tok" / "tokenizer.json").is_file()
    bad = run_script(script, "--input", tmp_path / "missing.jsonl", "--vocab-size", "300", "--output", tmp_path / "tok2")
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr and "Traceback" not in bad.stderr
