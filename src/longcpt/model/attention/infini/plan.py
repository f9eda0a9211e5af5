"""What `longcpt plan` adds for Infini-attention (`longcpt.plan`, docs/plan.md).

* Pairs: causal attention inside each segment of `segment_len` tokens of every document piece.
* FLOPs: the memory read and write, about 2 D^2 (Hq + 2 Hk) per token and layer in the forward;
  segment-major training recomputes every segment group's forward once (its checkpoint).
* Activations: one group of at most micro_batch x segment_len tokens is live at a time, plus every
  layer's memory per document; a block keeps its float32 memory read (elu features, read,
  normaliser, gate mix) besides what every block keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


def segment_pairs(pieces: Sequence[int], options: dict[str, Any]) -> float:
    """Causal pairs of document pieces, each cut into segments of `segment_len` tokens."""
    segment = int(options["segment_len"])
    total = 0.0
    for n in pieces:
        whole, rest = divmod(n, segment)
        total += whole * segment * (segment + 1) / 2 + rest * (rest + 1) / 2
    return total


def memory_flops(shape, options: dict[str, Any]) -> float:
    """Forward FLOPs per token and layer of the memory read and write."""
    d = shape.head_dim
    return 2 * d * d * (shape.heads + 2 * shape.kv_heads)


def layer_bytes(shape, act: int, device: str, options: dict[str, Any]) -> int:
    """Extra bytes per token a block keeps: the float32 memory read and its inputs."""
    hq, hk, d = shape.heads, shape.kv_heads, shape.head_dim
    hqd = hq * d
    return (12 if act == 4 else 16) * hqd + 16 * hk * d + 8 * (hq + hk) + act * hqd


def live_tokens(tokens: int, micro_batch: int, options: dict[str, Any]) -> tuple[int, str]:
    """Segment-major training: one group of at most micro_batch x segment_len tokens is live at a
    time (its forward is recomputed in the backward)."""
    n = min(tokens, micro_batch * int(options["segment_len"]))
    return n, f"{n:,} tokens (one segment group)"


def activations(items: list, ctx) -> list:
    """The memories every layer keeps per document, and with activation checkpointing the groups
    already done (`ctx`: cfg, shape, prec, layout, tokens, item, moments)."""
    shape, layout, cfg = ctx.shape, ctx.layout, ctx.cfg
    layers, hk, d, r, c = shape.layers, shape.kv_heads, shape.head_dim, ctx.prec.residual, shape.hidden
    n, seg = ctx.tokens, int(cfg.attention.options["segment_len"])
    memory = layers * layout.micro_batch * 4 * (2 * hk * d * (d + 1))
    items = items + [ctx.item("activations", "Infini memories (M, z) in and out", memory,
                              f"{layers} layers x {layout.micro_batch} docs x 2 x Hk x D x (D+1) x 4 B",
                              ctx.moments[:2])]
    if not cfg.trainer.activation_checkpointing:
        return items
    # The backward recomputes the groups last to first, and each group's loss forward again
    # (the loss moment's terms); tensors a group recomputed but its backward never read (the
    # memory write's float32 keys and values, the blocks' inputs) stay until the whole
    # backward ends. Measured (4-layer x 256 model, 2-4 groups): about 28 Hk D + C r bytes
    # per token and layer of every group already done.
    groups = -(-layout.seq_len // seg)
    kept = (groups - 1) * n * layers * (28 * hk * d + r * c)
    items = [dataclasses.replace(i, when=("loss", "backward")) if i.when == ("loss",) else i for i in items]
    items = [i for i in items if i.when != ("backward",)]
    items.append(ctx.item("activations", "segment groups already done", kept,
                          f"{groups - 1} groups x {n:,} tokens x {layers} x (28 Hk D + C x {r}) B", ("backward",)))
    return items
