"""The benchmark scripts' arguments: bad values are refused with a message, odd ones still measure."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def infllm_bench() -> dict:
    return runpy.run_path(str(BENCHMARKS / "infllm.py"))  # its globals; main() is not run


@pytest.mark.parametrize("argv, message", [
    (["--chunk", "0"], "--chunk 0: must be >= 1 token"),
    (["--window", "-1"], "--window -1: must be >= 1 token"),
    (["--marks", "65536,16384"], "--marks 65536,16384: expected increasing positive lengths"),
    (["--marks", ","], "expected a comma-separated list"),
])
def test_infllm_benchmark_refuses_bad_arguments(infllm_bench, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        infllm_bench["main"](argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_infllm_benchmark_times_a_window_shorter_than_a_call(infllm_bench, monkeypatch):
    """--window < --chunk: a call ends at every mark, and the call that reaches into the window is
    timed whole, so every mark gets its row."""
    for key, value in (("vocab_size", 256), ("max_position_embeddings", 64)):  # the benchmark's model, shorter
        monkeypatch.setitem(infllm_bench["MODEL"], key, value)
    rows = infllm_bench["stream"]("infllm", length=48, marks=[32, 48], chunk=24, window=4, device="cpu")
    assert [r["length"] for r in rows] == [32, 48]
    assert all(r["us_per_token"] > 0 and r["cpu_us_per_token"] > 0 for r in rows)
