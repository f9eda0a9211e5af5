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


def return_freed_memory() -> None:
    """Make glibc give every freed buffer of 64 KiB or more back to the system at once (the
    MALLOC_MMAP_THRESHOLD_ environment variable, set from inside), so the resident set follows the
    live tensors and a peak measured after an earlier, larger step is this step's own."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_above_start(fn) -> int:
    """Bytes of resident memory `fn()` adds at its peak (Linux VmHWM, reset before it; 0 elsewhere)."""
    status = Path("/proc/self/status")
    clear = Path("/proc/self/clear_refs")
    if not status.exists() or not clear.exists():
        fn()
        return 0

    def field(name: str) -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith(name + ":"))
        return int(line.split()[1]) * 1024

    clear.write_text("5")  # VmHWM := the current resident size (Linux >= 4.0)
    start = field("VmRSS")
    fn()
    return field("VmHWM") - start
