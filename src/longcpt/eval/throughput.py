"""What every evaluation reports about how it ran: seconds, tokens per second, and the KV cache an
evicting attention kind kept (`Meter`); and how prompts of one length are batched (`batches`).

    meter = Meter()
    for group in batches(prompts, length, batch_tokens):
        state = {}
        generate(model, ids, ..., state=state)
        use = meter.add(length * len(group), state)   # the cache use of this call, or None
    report = {**meter.report(), **cache_report(uses of every row)}

A resumed run times only what it evaluated (`generated` rows); the cache figures are the mean
over every row of the report (`cache_report`), as each row records its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

# Keys of a row's cache use (`longcpt.model.generation.cache_use`).
CACHE_KEYS = ("kv_kept", "kv_kept_mean", "kv_peak")


def batches(items: Sequence, length: int, batch_tokens: int) -> Iterator[list]:
    """`items` (prompts of `length` tokens each) in consecutive groups of at most `batch_tokens`
    tokens, at least one prompt per group."""
    per_batch = max(1, batch_tokens // length)
    for first in range(0, len(items), per_batch):
        yield list(items[first : first + per_batch])


class Meter:
    """Wall time and tokens of what an evaluation runs, and the cache use of each model state."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self.generated = 0

    def add(self, tokens: int, state: dict | None = None, rows: int = 1) -> dict[str, float] | None:
        """Count `tokens` read for `rows` new rows; returns `state`'s cache use (None: nothing evicts)."""
        from longcpt.model.generation import cache_use

        self.tokens += tokens
        self.generated += rows
        return cache_use(state) if state is not None else None

    def report(self) -> dict[str, Any]:
        """{"seconds", "tokens_per_second", "generated"} of this run."""
        seconds = time.perf_counter() - self.start
        return {"seconds": round(seconds, 2),
                "tokens_per_second": round(self.tokens / seconds, 1) if self.tokens and seconds > 0 else None,
                "generated": self.generated}


def cache_report(rows: Sequence[dict]) -> dict[str, float | None]:
    """Mean of each cache figure over the rows that report it (None when none does)."""
    out = {}
    for key in CACHE_KEYS:
        values = [row[key] for row in rows if row.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out
