"""The AnchorAttention recipes load, validate and say what they promise in their headers."""

from pathlib import Path

import pytest

from longcpt.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize(
    "name, seq_len, theta",
    [("anchor_llama2_7b_64k.yaml", 65536, 1.0e5), ("anchor_llama3_8b_128k.yaml", 131072, 2.0e7)],
)
def test_anchor_recipe(name, seq_len, theta):
    path = RECIPES / name
    header = path.read_text().splitlines()[0]
    assert header.startswith("# AnchorAttention continual pretraining")
    cfg = load_config(path)
    assert cfg.attention.kind == "anchor" and cfg.rope.precision == "fp32"
    assert cfg.data.seq_len == seq_len
    assert cfg.rope.theta == theta
    assert f"{int(theta):,}" in path.read_text()  # the header names the theta it sets
