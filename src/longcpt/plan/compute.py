"""FLOPs of a training step and the step time they imply at an assumed utilisation.

Model FLOPs per token: 6 x the matmul parameters (forward 2, backward 4: Kaplan et al. 2020,
PaLM appendix B; with LoRA the frozen weights' 2 of the backward's 4 are not computed), plus attention: QK^T and AV cost 2 x 2 x Hq x D per attended (query, key) pair
in the forward, and three times that forward and backward. How many pairs a window attends
depends on the attention kind and the documents; the kind says (its `plan` hook,
`longcpt.model.attention.PlanTerms`):

    full                 T (T+1) / 2 per window, whatever the documents
    intra_doc, anchor    sum over the window's document pieces of l (l+1) / 2
    infini               the same inside each segment of segment_len tokens, plus the memory
                         read and write (about 2 D^2 (Hq + 2 Hk) per token per layer forward)

A kind may add forward FLOPs of its own per token and layer (`extra_flops`).

The document pieces come from the recipe's own data (`data.train`, planned by
`longcpt.data.packing.plan_windows` exactly as training packs it) when it exists, else one
document per window is assumed (the most attention a window can cost).

Recomputation (activation checkpointing, a kind's own such as Infini's per-segment checkpoint:
its `recomputes` plan term) adds one forward each, which the hardware executes but model FLOPs
utilisation does not count (MFU, PaLM appendix B: model FLOPs per second over peak). The step
time follows from the assumed MFU; the hardware FLOPs utilisation (HFU, recomputation included,
the figure profilers and DeepSpeed's FLOPs profiler report) is then higher by (model + recomputed) / model:

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


def plan_terms(kind: str):
    """The `PlanTerms` of a trainable kind.

    Raises:
        LongcptError: an unknown kind, or one that declares no plan terms (every trainable kind must).
    """
    from longcpt.errors import LongcptError
    from longcpt.model.attention import kind_spec

    terms = kind_spec(kind, "attention.kind").hooks.plan
    if terms is None:
        raise LongcptError(f"attention.kind={kind!r} declares no plan terms (its `plan` hook); it cannot be planned")
    return terms


def attention_pairs(cfg) -> AttentionPairs:
    """Pairs per window for the recipe's attention kind, from its data when available."""
    from longcpt.model.attention import kind_spec

    t, kind, options = cfg.data.seq_len, cfg.attention.kind, cfg.attention.options
    terms = plan_terms(kind)
    if kind_spec(kind).hooks.across_documents:
        return AttentionPairs(terms.pairs([t], options), f"{kind} causal attention over the window")
    lengths = _piece_lengths(cfg)
    if lengths is None:
        pieces = [[t]]
        source = "one document per window (no prepared data.train to read document lengths from)"
    else:
        pieces, source = lengths
    total = sum(terms.pairs(window, options) for window in pieces)
    return AttentionPairs(total / len(pieces), source, sum(map(len, pieces)) / len(pieces))


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


def forward_flops(shape, kind: str, options: dict, tokens: float, pairs: float, windows: float = 1) -> float:
    """Forward model FLOPs of `windows` windows holding `tokens` tokens in all, each attending `pairs`
    (query, key) pairs in every layer: the matmuls, the attention pairs and the kind's own terms
    (module docstring). Backward is twice this; recomputation is `plan_terms(kind).recomputes` more."""
    layers, hqd = shape.layers, shape.heads * shape.head_dim
    dense = 2 * shape.matmul_parameters * tokens
    attention = 4 * hqd * pairs * windows * layers
    terms = plan_terms(kind)
    if terms.extra_flops is not None:
        attention += terms.extra_flops(shape, options) * tokens * layers
    return dense + attention


def batch_flops(shape, kind: str, options: dict, rows: list[list[int]]) -> float:
    """Model FLOPs (forward and backward) of one step over a batch whose rows hold documents of
    these lengths (how `longcpt doctor` counts the step it times)."""
    from longcpt.model.attention import kind_spec

    terms, across = plan_terms(kind), kind_spec(kind).hooks.across_documents
    pairs = sum(terms.pairs([sum(row)] if across else row, options) for row in rows)
    tokens = sum(map(sum, rows))
    return 3 * forward_flops(shape, kind, options, tokens, pairs) - frozen_weight_gradient_flops(shape, tokens)


def frozen_weight_gradient_flops(shape, tokens: float) -> float:
    """The backward's weight-gradient matmuls of frozen weights (LoRA's base), which are not computed:
    2 FLOPs per frozen matmul weight and token (the input gradients still are: the adapters below need them)."""
    return 2 * shape.frozen_matmul * tokens


def step_time(cfg, shape, world: int, peak_flops: float, mfu: float) -> StepTime:
    """Model and recomputed FLOPs of one optimizer step and its time at model FLOPs utilisation `mfu`
    of `peak_flops` per device (module docstring)."""
    t, mb = cfg.data.seq_len, cfg.data.micro_batch_size
    sp = cfg.strategy.sequence_parallel
    windows = mb * (world // sp) * cfg.optim.accumulate_grad_batches  # per optimizer step, all devices
    tokens = windows * t
    pairs = attention_pairs(cfg)
    forward = forward_flops(shape, cfg.attention.kind, cfg.attention.options, tokens, pairs.pairs, windows)
    model = 3 * forward - frozen_weight_gradient_flops(shape, tokens)
    recomputes = int(cfg.trainer.activation_checkpointing) + plan_terms(cfg.attention.kind).recomputes
    recompute = recomputes * forward
    seconds = model / (world * peak_flops * mfu)
    return StepTime(model, recompute, tokens, seconds, peak_flops, mfu, pairs)
