"""FLOPs of a training step and the step time they imply at an assumed utilisation.

Model FLOPs per token: 6 x the matmul parameters (forward 2, backward 4: Kaplan et al. 2020,
PaLM appendix B), plus attention: QK^T and AV cost 2 x 2 x Hq x D per attended (query, key) pair
in the forward, and three times that forward and backward. How many pairs a window attends
depends on the attention kind and the documents:

    full                 T (T+1) / 2 per window, whatever the documents
    intra_doc, anchor    sum over the window's document pieces of l (l+1) / 2
    infini               the same inside each segment of segment_len tokens, plus the memory
                         read and write (about 2 D^2 (Hq + 2 Hk) per token per layer forward)

The document pieces come from the recipe's own data (`data.train`, planned by
`longcpt.data.packing.plan_windows` exactly as training packs it) when it exists, else one
document per window is assumed (the most attention a window can cost).

Recomputation (activation checkpointing, Infini's per-segment checkpoint) adds one forward, which
the hardware executes but model FLOPs utilisation does not count (MFU, PaLM appendix B: model
FLOPs per second over peak). The step time follows from the assumed MFU; the hardware FLOPs
utilisation (HFU, recomputation included, the figure profilers and DeepSpeed's FLOPs profiler
report) is then higher by (model + recomputed) / model:

    step time = model FLOPs / (devices x peak FLOP/s x MFU)
    HFU       = (model FLOPs + recomputed FLOPs) / (devices x peak FLOP/s x step time)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Windows sampled from the data to estimate attention pairs (enough for a stable mean).
SAMPLE_WINDOWS = 256


@dataclass(frozen=True)
class AttentionPairs:
    """Mean (query, key) pairs attended per window, and where the figure comes from."""

    pairs: float
    source: str
    mean_pieces: float = 1.0


def attention_pairs(cfg) -> AttentionPairs:
    """Pairs per window for the recipe's attention kind, from its data when available."""
    t, kind = cfg.data.seq_len, cfg.attention.kind
    if kind not in ("full", "intra_doc", "anchor", "infini"):
        return AttentionPairs(t * (t + 1) / 2, f"{kind}: counted as full causal attention")
    if kind == "full":
        return AttentionPairs(t * (t + 1) / 2, "full causal attention over the window")
    lengths = _piece_lengths(cfg)
    if lengths is None:
        pieces = [[t]]
        source = "one document per window (no prepared data.train to read document lengths from)"
    else:
        pieces, source = lengths
    segment = int(cfg.attention.options["segment_len"]) if kind == "infini" else None
    total = sum(sum(_pairs(n, segment) for n in window) for window in pieces)
    return AttentionPairs(total / len(pieces), source, sum(map(len, pieces)) / len(pieces))


def _pairs(n: int, segment: int | None) -> float:
    """Causal pairs of a piece of n tokens (inside segments of `segment` tokens for Infini)."""
    if segment is None or n <= segment:
        return n * (n + 1) / 2
    whole, rest = divmod(n, segment)
    return whole * segment * (segment + 1) / 2 + rest * (rest + 1) / 2


def _piece_lengths(cfg) -> tuple[list[list[int]], str] | None:
    """Document-piece lengths of up to SAMPLE_WINDOWS windows packed from `data.train`."""
    data = cfg.data
    if data.task != "pretrain" or data.train is None or not Path(data.train).is_dir():
        return None
    return _packed(str(Path(data.train).resolve()), data.seq_len, data.packing, data.bfd_buffer, cfg.trainer.seed)


@functools.lru_cache(maxsize=8)
def _packed(train: str, seq_len: int, packing: str, bfd_buffer: int, seed: int):
    """`_piece_lengths` for one data set and packing (the changes a plan tries share it)."""
    from longcpt.data.packing import plan_windows
    from longcpt.data.stream import TokenStore

    store = TokenStore(train)
    if not len(store):
        return None
    order = np.random.default_rng(seed).permutation(len(store))
    windows = []
    for pieces in plan_windows(store.lengths[order].tolist(), seq_len, packing, bfd_buffer):
        sizes = [p.size for p in pieces]
        if sum(sizes) < seq_len:
            sizes.append(seq_len - sum(sizes))  # the padding pseudo-document attends too
        windows.append(sizes)
        if len(windows) == SAMPLE_WINDOWS:
            break
    return windows, f"document lengths of {train} ({len(windows)} windows packed with {packing})"


@dataclass(frozen=True)
class StepTime:
    """FLOPs and time of one optimizer step (all devices)."""

    model_flops: float
    recompute_flops: float
    tokens: int
    seconds: float
    peak_flops: float
    mfu: float
    pairs: AttentionPairs

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def hfu(self) -> float:
        """Hardware FLOPs utilisation at this step time: recomputed FLOPs counted too."""
        return self.mfu * (self.model_flops + self.recompute_flops) / self.model_flops if self.model_flops else 0.0


def step_time(cfg, shape, world: int, peak_flops: float, mfu: float) -> StepTime:
    """Model and recomputed FLOPs of one optimizer step and its time at model FLOPs utilisation `mfu`
    of `peak_flops` per device (module docstring)."""
    t, mb = cfg.data.seq_len, cfg.data.micro_batch_size
    sp = cfg.strategy.sequence_parallel
    windows = mb * (world // sp) * cfg.optim.accumulate_grad_batches  # per optimizer step, all devices
    tokens = windows * t
    pairs = attention_pairs(cfg)
    layers, hqd = shape.layers, shape.heads * shape.head_dim
    dense_fwd = 2 * shape.matmul_parameters * tokens
    attention_fwd = 4 * hqd * pairs.pairs * windows * layers
    if cfg.attention.kind == "infini":
        d = shape.head_dim
        attention_fwd += 2 * d * d * (shape.heads + 2 * shape.kv_heads) * tokens * layers
    forward = dense_fwd + attention_fwd
    model = 3 * forward
    recomputes = int(cfg.trainer.activation_checkpointing) + int(cfg.attention.kind == "infini")
    recompute = recomputes * forward
    seconds = model / (world * peak_flops * mfu)
    return StepTime(model, recompute, tokens, seconds, peak_flops, mfu, pairs)
