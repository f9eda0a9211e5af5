"""Helpers shared by the speed benchmarks: packed document lengths, interleaved timing, labels."""

from __future__ import annotations

import time

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
