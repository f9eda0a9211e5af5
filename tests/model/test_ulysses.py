"""Sequence parallelism (Ulysses) equals one process: loss and gradients, on CPU processes over gloo.

Windows of 2 rows x 32 tokens hold documents that cross the rank boundaries (every T/2 and T/4
tokens) and a padding document without labels, so ranks hold different numbers of labels. The
tiny model has 4 query heads and 2 KV heads: with 4 ranks each KV head is repeated for two ranks.

  * 2 processes: sequence_parallel=2 (one window);
  * 4 processes: sequence_parallel=4 (one window), and sequence_parallel=2 with two groups reading
    two windows (data parallel x sequence parallel), plus activation checkpointing;
  * and a bf16 autocast run on 2 processes (bf16 all-to-alls over gloo), equal to one process
    within bf16 rounding.

Each case compares with one process on the same window(s), fp32, <= 1e-5 relative (measured:
about 2e-7). The negative control shows the check can fail: a mean of per-rank mean losses, the
usual mistake, is off by about 2e-3 on these windows.
"""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("ulysses_worker.py")


def launch(world: int, out: Path, forkserver) -> list[dict]:
    """`world` ranks of ulysses_worker.py, started together as fork server children."""
    ranks = forkserver.run_ranks(str(WORKER), [str(out)], out / "rank", world=world)
    for child in ranks:
        assert child.returncode == 0, child.output()[-4000:]
    return [row for r in range(world) for row in json.loads((out / f"rank{r}.json").read_text())]


@pytest.fixture(scope="module")
def rows(tmp_path_factory, forkserver) -> list[dict]:
    found = []
    for world in (2, 4):
        out = tmp_path_factory.mktemp(f"ulysses{world}")
        found += launch(world, out, forkserver)
    return found


def fp32(rows):
    return [r for r in rows if r["kind"] != "anchor-bf16"]


def test_every_case_ran_on_every_rank(rows):
    cases = {(r["world"], r["sp"], r["kind"], r["checkpointing"]) for r in fp32(rows)}
    kinds = ("full", "intra_doc", "anchor")
    expected = {(2, 2, k, False) for k in kinds} | {(4, n, k, False) for n in (2, 4) for k in kinds}
    assert cases == expected | {(4, 4, "anchor", True)}
    assert len(rows) == 2 * 4 + 4 * 7


def test_loss_and_gradients_equal_one_process(rows):
    for r in fp32(rows):
        assert r["loss_rel"] <= 1e-5, r
        assert r["grad_rel"] <= 1e-5, r


def test_mean_of_rank_means_would_be_caught(rows):
    # The same tolerance rejects the wrong reduction: ranks hold unequal numbers of labels.
    for r in fp32(rows):
        assert r["naive_rel"] > 1e-4, r


def test_bf16_runs_and_matches_within_rounding(rows):
    bf16 = [r for r in rows if r["kind"] == "anchor-bf16"]
    assert len(bf16) == 2
    for r in bf16:
        assert r["loss_rel"] < 1e-2, r
