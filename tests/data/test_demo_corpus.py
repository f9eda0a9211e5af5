"""Demo corpus: real standard-library text, thousands of documents of very different lengths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longcpt.data.demo_corpus import build_demo_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("demo"))


def test_thousands_of_real_documents_of_very_different_lengths(corpus):
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert 2000 <= len(docs) <= 4000
    assert [d["id"] for d in docs] == list(range(len(docs)))
    assert {d["kind"] for d in docs} == {"module", "docstring"}
    lengths = np.array([len(d["text"]) for d in docs])
    assert lengths.min() > 0 and np.percentile(lengths, 10) < 200 and lengths.max() > 30_000
    assert any("def " in d["text"] for d in docs if d["kind"] == "module")


def test_deterministic(corpus, tmp_path):
    again = build_demo_corpus(tmp_path, max_docs=300)  # same walk, stopped early
    assert again.read_text().splitlines() == corpus.read_text().splitlines()[:300]


@pytest.mark.subprocess
def test_limits_and_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, "-m", "longcpt.data.demo_corpus", "--output", str(tmp_path),
                          "--max-docs", "50"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote 50 documents" in run.stdout
    assert len((tmp_path / "corpus.jsonl").read_text().splitlines()) == 50
