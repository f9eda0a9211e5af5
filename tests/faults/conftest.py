"""Fault-injection suite: what a cluster throws at a long run, and proof that nothing is lost.

Runs are tiny (2 layers x 64, windows of 32 tokens, a few steps on CPU): most tests train in
process on the synthetic DataModule of tests/lit/lit_helpers.py; the ones that must kill, signal
or hang a real process run `longcpt train` (or tests/lit/run_train.py) as children of a fork
server (tests/forkserver.py, the `forkserver` fixture), which saves each of them Python's start-up.
"""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "lit"))
sys.path.insert(0, str(HERE))

from fault_helpers import STEPS, make_data, run, weights  # noqa: E402
from tiny import word_tokenizer  # noqa: E402

# One thread: the suite runs beside other jobs, and in-process runs compare weights bit for bit
# (the reference and the resumed run use the same thread count either way).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A real prepared data set (train/ and val/) in the test tokenizer's words."""
    return make_data(tmp_path_factory.mktemp("data"), tokenizer_dir)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, tokenizer_dir) -> dict:
    """Final weights of an uninterrupted in-process run of STEPS steps: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(out, tokenizer_dir, trainer__max_steps=STEPS)
    return weights(out / "checkpoints" / "last")
