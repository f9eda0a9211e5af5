"""mix_datasets: token shares per source, long-document upsampling within a source, determinism."""

import json
from pathlib import Path

import numpy as np
import pytest

from longcpt.data.mix import format_report, length_factors, mix_datasets, parse_source, parse_upsample
from longcpt.data.stream import TokenStore
from longcpt.errors import LongcptError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sources(tmp_path, make_dataset):
    """Source A: 300 short docs (~20 tokens) and 30 long ones (200); source B: 200 docs of 50."""
    rng = np.random.default_rng(0)
    a = rng.integers(10, 30, size=300).tolist() + [200] * 30
    make_dataset(tmp_path / "a", a, seed=1, start_token=3, vocab=1000)
    make_dataset(tmp_path / "b", [50] * 200, seed=2, start_token=1000, vocab=2000)  # B's tokens are >= 1000
    return tmp_path / "a", tmp_path / "b"


def tokens_by_source(path):
    """(tokens from A, tokens from B, tokens in long docs of A), read back from the mix itself."""
    store = TokenStore(path)
    docs = [store[i] for i in range(len(store))]
    from_b = sum(len(d) for d in docs if d[0] >= 1000)
    from_a = sum(len(d) for d in docs if d[0] < 1000)
    long_a = sum(len(d) for d in docs if d[0] < 1000 and len(d) >= 100)
    return from_a, from_b, long_a


def test_shares_follow_the_weights(sources, tmp_path):
    a, b = sources
    report = mix_datasets([(a, 1.0), (b, 3.0)], tmp_path / "mix", seed=0)
    from_a, from_b, _ = tokens_by_source(tmp_path / "mix")
    assert from_a / (from_a + from_b) == pytest.approx(0.25, abs=0.02)
    # default size: the scarcer source (A relative to its share) is used once, B is subsampled
    assert report["sources"][0]["share"] == pytest.approx(from_a / (from_a + from_b))
    assert report["tokens"] == from_a + from_b
    assert json.loads((tmp_path / "mix" / "report.json").read_text()) == report


def test_upsampling_raises_the_long_share_within_a_source_but_keeps_the_source_share(sources, tmp_path):
    a, b = sources
    mix_datasets([(a, 1.0), (b, 1.0)], tmp_path / "plain", seed=0, total_tokens=20000)
    report = mix_datasets([(a, 1.0), (b, 1.0)], tmp_path / "up", seed=0, total_tokens=20000,
                          upsample_long=[(100, 4.0)])
    plain_a, plain_b, plain_long = tokens_by_source(tmp_path / "plain")
    up_a, up_b, up_long = tokens_by_source(tmp_path / "up")
    for src_a, src_b in ((plain_a, plain_b), (up_a, up_b)):
        assert src_a / (src_a + src_b) == pytest.approx(0.5, abs=0.03)
    # in A, long docs hold 6000 of ~12000 tokens (1/2); drawn 4x as often: 4*6000/(4*6000+6000) = 0.8
    assert plain_long / plain_a == pytest.approx(0.5, abs=0.06)
    assert up_long / up_a == pytest.approx(0.8, abs=0.05)
    assert report["sources"][0]["bucket_share"] == pytest.approx(
        {"<1K": 1.0, "1K-4K": 0.0, "4K-16K": 0.0, "16K-64K": 0.0, ">=64K": 0.0})
    assert "<1K" in format_report(report)


def test_same_seed_same_mix_other_seed_other_order(sources, tmp_path):
    a, b = sources
    for name, seed in (("x", 5), ("y", 5), ("z", 6)):
        mix_datasets([(a, 1.0), (b, 1.0)], tmp_path / name, seed=seed)
    x, y, z = (TokenStore(tmp_path / n) for n in "xyz")
    assert [x[i].tolist() for i in range(len(x))] == [y[i].tolist() for i in range(len(y))]
    assert [x[i].tolist() for i in range(min(len(x), len(z)))] != [z[i].tolist() for i in range(min(len(x), len(z)))]


def test_length_factors_use_the_largest_reached_threshold():
    assert length_factors(np.array([10, 100, 1000, 5000]), [(1000, 4.0), (100, 2.0)]).tolist() == [1, 2, 4, 4]


def test_bad_arguments_are_named(sources, tmp_path):
    with pytest.raises(LongcptError, match="DIR:WEIGHT"):
        parse_source("data/books")
    with pytest.raises(LongcptError, match="weight > 0"):
        parse_source("data/books:-1")
    assert parse_source("C:/x:y:0.5") == ("C:/x:y", 0.5)
    with pytest.raises(LongcptError, match="MIN_TOKENS:FACTOR"):
        parse_upsample("8192")
    with pytest.raises(LongcptError, match="not found"):
        mix_datasets([(tmp_path / "missing", 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_shares(sources, tmp_path, run_script):
    a, b = sources
    run = run_script(REPO / "data_prep" / "mix.py", "--input", f"{a}:1", f"{b}:3", "--output", tmp_path / "mix",
                     "--upsample-long", "100:2", "--seed", "1")
    assert run.returncode == 0, run.stderr
    assert "target" in run.stdout and "25.0%" in run.stdout and (tmp_path / "mix" / "report.json").is_file()
