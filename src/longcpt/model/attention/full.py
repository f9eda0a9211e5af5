"""`full`: causal attention over the whole row, across document boundaries (the baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcpt.model.attention import register


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with grouped KV heads: q (B, Hq, T, D), k/v (B, Hk, T, D).

    Uses SDPA's `is_causal` path (no explicit mask, so the fused kernels apply) and lets SDPA
    broadcast the KV heads (`enable_gqa`) instead of materialising repeated K/V.
    """
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


@register("full")
class FullAttention(nn.Module):
    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, q, k, v, ctx):
        q, k = ctx.rotate(q, k)
        return causal_attention(q, k, v)
