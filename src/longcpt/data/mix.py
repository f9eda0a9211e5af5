"""Mixing prepared data sets by token share, with long documents upsampled within each source.

Long-context continual pretraining keeps the domain mixture and shifts each domain towards its
long documents: "Data Engineering for Scaling Language Models to 128K Context" (Fu et al. 2024,
arXiv 2402.10171) finds per-source length upsampling best (global upsampling skews domains), and
ProLong (Gao et al. 2024, arXiv 2410.02660) sets explicit token shares per source (e.g. 30% code
repositories, 30% books, the rest short high-quality data).

So, for sources i with weights w_i:

    share_i   = w_i / sum(w)                                    target token share
    u_d       = factor of the largest threshold <= len(d)       e.g. 4096:2 16384:4 (1 below all)
    A_i       = sum_d u_d * len(d)                              tokens of one upsampled pass
    T         = total_tokens, or min_i A_i / share_i            (default: no source repeats)
    copies_d  = stochastic rounding of (share_i * T / A_i) * u_d    seeded, E[tokens_i] = share_i * T

Shares are counted in document tokens (without BOS/EOS). The result is a data set like
`prepare_corpus` writes (column `input_ids`, documents in a seeded random order) plus
`report.json` with the token share per source and per length bucket.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longcpt.errors import LongcptError
from longcpt.fsio import atomic_dir

DEFAULT_BUCKETS = (1024, 4096, 16384, 65536)  # bucket edges in tokens: <1K, 1K-4K, ..., >=64K


def parse_source(text: str) -> tuple[str, float]:
    """`DIR:WEIGHT` -> (DIR, WEIGHT); the last colon splits, so paths may contain colons."""
    path, sep, weight = text.rpartition(":")
    try:
        value = float(weight) if sep else None
    except ValueError:
        value = None
    if not sep or not path or value is None or not value > 0:
        raise LongcptError(f"--input {text!r}: expected DIR:WEIGHT with a weight > 0, e.g. data/books:0.3")
    return path, value


def parse_upsample(text: str) -> tuple[int, float]:
    """`MIN_TOKENS:FACTOR` -> (MIN_TOKENS, FACTOR)."""
    length, sep, factor = text.partition(":")
    try:
        pair = (int(length), float(factor))
    except ValueError:
        pair = None
    if not sep or pair is None or pair[0] < 1 or not pair[1] > 0:
        raise LongcptError(f"--upsample-long {text!r}: expected MIN_TOKENS:FACTOR, e.g. 8192:4 "
                           "(documents of at least 8192 tokens drawn 4x as often)")
    return pair


def length_factors(lengths: np.ndarray, upsample_long: Sequence[tuple[int, float]]) -> np.ndarray:
    """Per-document sampling factor: that of the largest threshold the document reaches, else 1."""
    factors = np.ones(len(lengths))
    for threshold, factor in sorted(upsample_long):
        factors[lengths >= threshold] = factor
    return factors


def stochastic_round(rate: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer copies per document with E[copies_d] = rate_d, and tokens close to their expectation.

    The fractional parts are drawn by systematic sampling over the documents sorted by length
    (random order among equal lengths): document d is drawn when an integer + u (u uniform in
    [0, 1)) falls in its slice of the running sum of fractions, which happens with probability
    exactly frac_d. Unlike independent coin flips, draws then spread evenly over the lengths, so a
    few long documents cannot swing a source's share.
    """
    base = np.floor(rate)
    frac = rate - base
    shuffled = rng.permutation(len(rate))
    order = shuffled[np.argsort(lengths[shuffled], kind="stable")]
    cum = np.cumsum(frac[order])
    u = rng.random()
    hits = np.floor(cum + u) - np.floor(np.concatenate([[0.0], cum[:-1]]) + u)  # 0 or 1 each
    extra = np.zeros(len(rate))
    extra[order] = hits
    return (base + extra).astype(np.int64)


def mix_datasets(
    sources: Sequence[tuple[str | Path, float]],
    output: str | Path,
    *,
    upsample_long: Sequence[tuple[int, float]] = (),
    total_tokens: int | None = None,
    seed: int = 0,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> dict:
    """Combine prepared data sets into one with the given token shares.

    Args:
        sources: (prepared data set folder, weight) pairs; weights are normalised to shares.
        output: folder to write (appears only when complete).
        upsample_long: (min_tokens, factor) pairs: documents of at least min_tokens are drawn
            factor times as often as the others of their source.
        total_tokens: size of the mix in document tokens (default: the largest mix in which no
            source repeats a document beyond its upsampling).
        seed: seed of the draw and of the document order.
        buckets: length bucket edges for the report.

    Returns:
        The report also written to `OUTPUT/report.json`: per source its share (target and
        achieved), documents and tokens; per length bucket the token share, overall and per source.

    Raises:
        LongcptError: no source, a missing or unprepared source, bad weights or factors.
    """
    from datasets import concatenate_datasets

    from longcpt.data.stream import TokenStore

    if not sources:
        raise LongcptError("no source given (pass --input DIR:WEIGHT ...)")
    if total_tokens is not None and total_tokens < 1:
        raise LongcptError(f"--total-tokens {total_tokens}: must be >= 1")
    weights = np.array([w for _, w in sources], dtype=np.float64)
    if not (weights > 0).all():
        raise LongcptError(f"weights {weights.tolist()}: every weight must be > 0")
    shares = weights / weights.sum()
    stores = [TokenStore(path) for path, _ in sources]
    for (path, _), store in zip(sources, stores):
        if len(store) == 0 or store.lengths.sum() == 0:
            raise LongcptError(f"source {str(path)!r} has no tokens")
    factors = [length_factors(s.lengths, upsample_long) for s in stores]
    passes = np.array([(f * s.lengths).sum() for f, s in zip(factors, stores)], dtype=np.float64)  # A_i
    total = float(total_tokens) if total_tokens is not None else float((passes / shares).min())

    picked = []
    for i, (store, f) in enumerate(zip(stores, factors)):
        rate = shares[i] * total / passes[i] * f  # expected copies of each document
        copies = stochastic_round(rate, store.lengths, np.random.default_rng([seed, i]))
        picked.append(np.repeat(np.arange(len(store)), copies))
    parts = [s.dataset.select(idx) for s, idx in zip(stores, picked)]
    mixed = concatenate_datasets(parts)
    order = np.random.default_rng([seed, len(sources)]).permutation(len(mixed))
    mixed = mixed.select(order).select_columns(["input_ids"])
    if len(mixed) == 0:
        raise LongcptError(f"the mix is empty: total tokens {total:.0f} is too small for the shares")

    lengths = [s.lengths[idx] for s, idx in zip(stores, picked)]
    report = _report(sources, shares, upsample_long, total, seed, lengths, buckets)
    with atomic_dir(output) as tmp:
        mixed.save_to_disk(str(tmp))
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _bucket_names(edges: Sequence[int]) -> list[str]:
    def k(n: int) -> str:
        return f"{n // 1024}K" if n % 1024 == 0 else str(n)

    edges = sorted(edges)
    names = [f"<{k(edges[0])}"] + [f"{k(a)}-{k(b)}" for a, b in zip(edges, edges[1:])] + [f">={k(edges[-1])}"]
    return names


def _report(sources, shares, upsample_long, total, seed, lengths: list[np.ndarray], buckets) -> dict:
    edges = sorted(buckets)
    names = _bucket_names(edges)
    tokens = np.array([ln.sum() for ln in lengths], dtype=np.float64)
    all_tokens = tokens.sum()
    per_bucket = np.zeros((len(lengths), len(names)))  # (source, bucket) tokens
    for i, ln in enumerate(lengths):
        b = np.searchsorted(edges, ln, side="right")
        np.add.at(per_bucket[i], b, ln)
    return {
        "seed": seed,
        "upsample_long": [list(p) for p in upsample_long],
        "target_tokens": round(total),
        "tokens": int(all_tokens),
        "documents": int(sum(len(ln) for ln in lengths)),
        "sources": [
            {
                "path": str(path),
                "weight": w,
                "target_share": float(shares[i]),
                "share": float(tokens[i] / all_tokens) if all_tokens else 0.0,
                "documents": int(len(lengths[i])),
                "tokens": int(tokens[i]),
                "bucket_share": {n: float(per_bucket[i, j] / tokens[i]) if tokens[i] else 0.0
                                 for j, n in enumerate(names)},
            }
            for i, (path, w) in enumerate(sources)
        ],
        "bucket_share": {n: float(per_bucket[:, j].sum() / all_tokens) if all_tokens else 0.0
                         for j, n in enumerate(names)},
    }


def format_report(report: dict) -> str:
    """The report as a plain-text table: one row per source, token shares per length bucket."""
    names = list(report["bucket_share"])
    head = f"{'source':<40} {'target':>7} {'share':>7} {'docs':>8} {'tokens':>12} " + " ".join(f"{n:>8}" for n in names)
    rows = [head, "-" * len(head)]
    for s in report["sources"]:
        rows.append(f"{s['path'][-40:]:<40} {s['target_share']:>7.1%} {s['share']:>7.1%} {s['documents']:>8} "
                    f"{s['tokens']:>12} " + " ".join(f"{s['bucket_share'][n]:>8.1%}" for n in names))
    rows.append(f"{'all':<40} {'':>7} {1:>7.1%} {report['documents']:>8} {report['tokens']:>12} "
                + " ".join(f"{report['bucket_share'][n]:>8.1%}" for n in names))
    rows.append("(bucket columns: share of the row's tokens in documents of that length)")
    return "\n".join(rows)
