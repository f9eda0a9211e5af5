"""Session fixtures: a tiny tokenizer and an exported tiny model folder."""

from __future__ import annotations

import pytest
from tiny import bpe_tokenizer, tiny_llama
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return bpe_tokenizer(200)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """An HF folder (weights + tokenizer) of a random tiny Llama, as `longcpt export` writes one."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
