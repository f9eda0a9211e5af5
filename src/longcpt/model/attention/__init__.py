"""Attention kinds behind one interface, picked by `attention.kind` (SPEC section 4).

Every kind is an `nn.Module` built as `cls(args, layer_idx)` whose forward takes the *un-rotated*
projections and the per-forward `AttentionContext`, and returns the attention output:

    core(q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, D), ctx) -> (B, Hq, T, D)

Rotation happens inside the core (through `ctx.rotate`), so a kind may use q/k before RoPE
(Infini-attention's memory does) or with its own positions.

A kind whose training must not run layer by layer over the whole window may define a static
`model_loss(model, input_ids, labels, position_ids, cu_seqlens, reduction, chunk_size)`;
`CausalLM.loss` then delegates to it (Infini-attention trains segment by segment).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from longcpt.model.rope import RotaryEmbedding, apply_rotary

ATTENTION_KINDS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an attention kind to the registry under `name`."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        ATTENTION_KINDS[name] = cls
        return cls

    return add


def build_attention(args, layer_idx: int) -> nn.Module:
    if args.attention not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {args.attention!r}; known: {sorted(ATTENTION_KINDS)}")
    return ATTENTION_KINDS[args.attention](args, layer_idx)


@dataclass
class AttentionContext:
    """What every layer's attention needs for one forward call.

    Attributes:
        position_ids: (B, T) integer positions used for RoPE.
        cu_seqlens: (N+1,) int32 document starts over the flattened B*T tokens, or None.
        cos, sin: (B, T, D) float32 tables for `position_ids`.
        rope: the model's rotary module (for kinds that need other positions).
        cache: scratch shared by the layers of this call (e.g. a document grouping computed once).
        state: recurrent state carried across calls (Infini memory), keyed by layer index.
    """

    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    rope: RotaryEmbedding
    cache: dict[str, Any] = field(default_factory=dict)
    state: dict[Any, Any] | None = None

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply RoPE at `position_ids` with the model's rope precision."""
        return apply_rotary(q, k, self.cos, self.sin, self.rope.precision)


# Register the built-in kinds.
from longcpt.model.attention import full, infini  # noqa: E402,F401
