import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_helpers import make_corpus  # noqa: E402
from tiny import word_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Real prepared data (train/val) and its BPE tokenizer, built once per session."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))
