"""Helpers shared by the speed benchmarks: packed document lengths, interleaved timing, labels."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch


def document_lengths(tokens: int, docs: int, seed: int, equal: bool) -> list[int]:
    """`docs` lengths summing to `tokens`: equal, or random within about 0.2x..2.5x of the mean."""
    if equal:
        return [tokens // docs] * (docs - 1) + [tokens - (tokens // docs) * (docs - 1)]
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(docs, generator=g) + 0.2
    lens = (w / w.sum() * tokens).long().clamp(min=1).tolist()
    lens[-1] += tokens - sum(lens)
    return lens


def size_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def timed_rows(rows: dict, reps: int) -> dict[str, float]:
    """Best of `reps` seconds per row, the rows run in turn each round.

    Interleaving spreads any load from other processes over all rows, and the minimum is the
    least disturbed run (as `timeit` reports); the first call of each row is a warm-up.
    """
    for fn in rows.values():
        fn()
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(reps):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def resident_bytes() -> int:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * resource.getpagesize()


def max_resident_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def growth(rows: list[dict], kind: str, key: str, low: int, high: int) -> float | None:
    """Relative change of `key` between the `kind` rows at lengths `low` and `high`."""
    by_length = {r["length"]: r[key] for r in rows if r["kind"] == kind}
    if low not in by_length or high not in by_length or not by_length[low]:
        return None
    return round(by_length[high] / by_length[low] - 1, 3)
