"""Shared fixtures for the data tests: small prepared data sets made on the spot."""

import numpy as np
import pytest


def make_prepared(path, lengths, seed=0, start_token=3, vocab=500):
    """Save a data set like prepare_corpus writes (column input_ids, int32) with docs of `lengths`."""
    from datasets import Dataset, Features, List, Value

    rng = np.random.default_rng(seed)
    rows = [rng.integers(start_token, vocab, size=n).astype(np.int32).tolist() for n in lengths]
    Dataset.from_dict({"input_ids": rows}, features=Features({"input_ids": List(Value("int32"))})).save_to_disk(
        str(path)
    )
    return rows


@pytest.fixture
def prepared(tmp_path):
    """(path, documents): 40 documents of 1 to 60 tokens."""
    lengths = np.random.default_rng(1).integers(1, 61, size=40).tolist()
    docs = make_prepared(tmp_path / "train", lengths)
    return tmp_path / "train", docs


@pytest.fixture
def make_dataset():
    """The `make_prepared` helper, for tests that need other lengths."""
    return make_prepared
