"""`full`: causal attention over the whole row, across document boundaries (the baseline).

Two paths:
  * no state (training, plain forward): one `is_causal` SDPA call over the row, nothing kept;
  * with `ctx.state` (generation, streaming evaluation): the rotated keys and values of every call
    are appended to a per-layer `KVCache` kept in `ctx.state[layer_idx]`, and the call's queries
    attend to everything cached so far. The caller passes absolute `position_ids`, so a prompt fed
    in chunks gives the same result as one call over the whole prompt.

Exported `full`, `intra_doc` and `anchor` models all load as `full`, so this is the inference path
for every non-Infini model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcpt.model.attention import KindHooks, PlanTerms, register, window_pairs


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with grouped KV heads: q (B, Hq, T, D), k/v (B, Hk, T, D).

    Uses SDPA's `is_causal` path (no explicit mask, so the fused kernels apply) and lets SDPA
    broadcast the KV heads (`enable_gqa`) instead of materialising repeated K/V.
    """
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def offset_causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True = may attend, for the last `t_q` of `t_k` positions.

    Query i sits at absolute position `t_k - t_q + i` and sees keys 0 .. that position
    (bottom-right aligned causal mask). Example, t_q = 2 new queries after 3 cached keys:

        keys     0 1 2 3 4
        query 0  x x x x .      (absolute position 3)
        query 1  x x x x x      (absolute position 4)

    SDPA's own `is_causal` aligns the diagonal top-left instead, which is wrong once a cache
    precedes the queries.
    """
    offset = t_k - t_q
    rows = torch.arange(t_q, device=device)[:, None] + offset  # (t_q, 1) absolute query positions
    cols = torch.arange(t_k, device=device)[None, :]  # (1, t_k)
    return cols <= rows


class KVCache:
    """Rotated keys and values of one layer, in a buffer grown by doubling.

    Appending copies only the new entries (amortised O(1) per token) instead of re-concatenating
    the whole cache on every generated token.

    Attributes:
        length: number of cached positions.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (B, Hk, capacity, D)
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k/v (B, Hk, t, D); return views of all cached keys and values (B, Hk, length, D)."""
        t = k.shape[2]
        if self.k is None or self.length + t > self.k.shape[2]:
            capacity = max(2 * (self.length + t), 256)
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])  # (B, Hk, capacity, D)
            new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if self.k is not None:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Append k/v (B, Hk, t, D) to `cache`; attend q (B, Hq, t, D) to the whole cache, causally."""
    k_all, v_all = cache.append(k, v)  # (B, Hk, S, D), S = cached length including this call
    t, s = q.shape[2], k_all.shape[2]
    gqa = q.shape[1] != k_all.shape[1]
    if t == s:  # first call: a plain causal prefill
        return F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=gqa)
    if t == 1:  # one new token sees every cached position: no mask needed
        return F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=gqa)
    mask = offset_causal_mask(t, s, q.device)  # (t, S)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)


def _doctor(tools) -> list:
    """One check: a tiny model under bf16 autocast against float64 (`KindCheckTools.model_check`)."""
    return [(tools.KERNELS, "full", lambda: tools.model_check("full", [{}], name=lambda options: "full sdpa"))]


_HOOKS = KindHooks(plan=PlanTerms(pairs=window_pairs), doctor=_doctor, across_documents=True)


@register("full", positions="arange", sequence_parallel=True, hooks=_HOOKS)
class FullAttention(nn.Module):
    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, q, k, v, ctx):
        q, k = ctx.rotate(q, k)
        if ctx.state is None:
            return causal_attention(q, k, v)
        cache = ctx.state.setdefault(self.layer_idx, KVCache())
        return cached_attention(q, k, v, cache)
