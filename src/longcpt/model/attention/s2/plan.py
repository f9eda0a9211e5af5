"""What `longcpt plan` adds for `s2` (`longcpt.plan`, docs/plan.md).

* Pairs: causal attention inside groups of `group_size` tokens of every document piece; with
  `shift`, half of the heads on groups offset by half a group (a first group of G/2 tokens).
* Activations: on the CPU path, as the document kinds', the kernel's token-major output and its
  re-ordered copy (the GPU kernels write in place).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def grouped_pairs(length: int, group_size: int, offset: int = 0) -> float:
    """Causal pairs of one document of `length` tokens cut into groups of `group_size` tokens,
    the first group `offset` tokens long when `offset` > 0."""
    if 0 < offset < length:
        return offset * (offset + 1) / 2 + grouped_pairs(length - offset, group_size)
    if offset >= length:
        return length * (length + 1) / 2
    whole, rest = divmod(length, group_size)
    return whole * group_size * (group_size + 1) / 2 + rest * (rest + 1) / 2


def pairs(pieces: Sequence[int], options: dict[str, Any]) -> float:
    """(query, key) pairs per head, averaged over the plain and the shifted half of the heads."""
    g = int(options["group_size"])
    shifted = g // 2 if options["shift"] else 0
    return sum((grouped_pairs(n, g) + grouped_pairs(n, g, shifted)) / 2 for n in pieces)


def layer_bytes(shape, act: int, device: str, options: dict[str, Any]) -> int:
    """Bytes per token and layer the CPU path keeps beyond every block's: the kernel's output and its
    re-ordered copy, as the document kinds' (`longcpt.model.attention.document`)."""
    return act * shape.heads * shape.head_dim if device == "cpu" else 0
