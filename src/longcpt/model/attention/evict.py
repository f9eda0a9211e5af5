"""KV-cache eviction: the bookkeeping every evicting kind shares, and the reference evictions.

An evicting kind keeps, per layer, an `EvictingCache`: the rotated keys and values of the tokens
it still holds, their absolute positions and a validity mask. Every `update_every` tokens (by
absolute position, in prefill and in generation alike) its `select` decides which cached tokens
stay; the others are dropped from the cache for good. Kept tokens keep their RoPE positions: keys
are cached already rotated and nothing is renumbered (as the NAMM reference does), so a kept
token is exactly the token the full cache would hold.

Attention over an evicting cache is computed with its weights (the policies need them: H2O sums
them, NAMM turns them into spectrograms), in float32, one update block at a time, so a T x T
matrix is never built: a block of t <= `update_every` queries attends to the S cached tokens.

    call of T tokens, update_every = U:
      positions  p0 ............................................ p0+T-1
      blocks     | to the next multiple of U | U tokens | ... | rest |
      per block: append k/v -> attend (weights) -> observe(weights) -> at a multiple of U: select

Feeding a prompt in chunks of any size therefore gives the same result as one call.

Layout. Heads keep different numbers of tokens (NAMM decides per head), yet the cache is one
rectangular tensor: after an eviction each (row, KV head) holds its kept tokens in position order,
left-padded to the longest; padding slots are invalid and masked out of attention.

    head 0:  [ t0  t3  t5  t9 ]        valid  1 1 1 1
    head 1:  [ --  --  t2  t9 ]        valid  0 0 1 1   (padding on the left)

Left padding keeps the newest token in the last slot of every head, and a scorer that lets each
token look only at newer ones (NAMM's backward mask) never sees the padding.

Kinds here (each an inference-time memory for any softmax model longcpt loads):
  * `h2o` (Zhang et al. 2023, arXiv 2306.14048): keep the `recent` newest tokens plus the
    heavy hitters, the tokens with the largest attention received so far (summed over every
    query since they entered, averaged over the query heads of a KV head), `cache_size` in all.
  * `streaming` (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453): keep the first `sinks`
    tokens (attention sinks) and the newest `cache_size - sinks`. Unlike the paper, positions are
    not re-assigned inside the cache (see above), so the model sees the same distances as `full`.

Shapes: B batch, Hq query heads, Hk KV heads, G = Hq / Hk, t new tokens, S cached tokens,
D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcpt.errors import LongcptError
from longcpt.model.attention import POSITIVE_INT, KindHooks, Option, optional, register

# Largest float32 score block (elements) built at once; larger blocks are cut along the queries.
_SCORE_BLOCK = 1 << 25


class EvictingCache:
    """One layer's cache for an evicting kind (see the module docstring for the layout).

    Attributes:
        k, v: (B, Hk, S, D) rotated keys and values.
        pos: (B, Hk, S) absolute positions of the entries.
        valid: (B, Hk, S) bool, False for padding slots.
        extra: per-entry buffers of the policy, each (B, Hk, S, ...); new entries get zeros and
            eviction gathers them with the keys.
        scratch: what else the policy keeps between calls (e.g. a counter).
        seen: tokens appended so far.
        slot_sum, slot_peak: (B,) over the tokens appended, the sum and the largest of the slots
            each one saw in its row (`slots`), itself included: the cache's size through time.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.extra: dict[str, torch.Tensor] = {}
        self.scratch: dict[str, object] = {}
        self.seen = 0
        self.slot_sum: torch.Tensor | None = None
        self.slot_peak: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def slots(self) -> torch.Tensor:
        """(B,) entries a row holds: its longest KV head, padding of the others included (what the
        rectangle of that row alone would need; the reference's cache size)."""
        return self.valid.sum(-1).amax(-1)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Add k/v (B, Hk, t, D) of the tokens at `positions` (t,)."""
        b, hk, t, _ = k.shape
        before = self.slots().double() if self.valid is not None else k.new_zeros(b, dtype=torch.float64)
        added = t * before + t * (t + 1) / 2  # token i of the block sees before + i + 1 slots
        self.slot_sum = added if self.slot_sum is None else self.slot_sum + added
        self.slot_peak = before + t if self.slot_peak is None else torch.maximum(self.slot_peak, before + t)
        pos = positions.view(1, 1, t).expand(b, hk, t)  # (B, Hk, t)
        valid = torch.ones(b, hk, t, dtype=torch.bool, device=k.device)
        if self.k is None:
            self.k, self.v, self.pos, self.valid = k, v, pos, valid
        else:
            self.k = torch.cat([self.k, k], dim=2)  # (B, Hk, S + t, D)
            self.v = torch.cat([self.v, v], dim=2)
            self.pos = torch.cat([self.pos, pos], dim=2)  # (B, Hk, S + t)
            self.valid = torch.cat([self.valid, valid], dim=2)
        for name, buf in self.extra.items():
            self.extra[name] = torch.cat([buf, buf.new_zeros(b, hk, t, *buf.shape[3:])], dim=2)
        self.seen += t

    def keep(self, mask: torch.Tensor) -> None:
        """Drop every entry whose `mask` (B, Hk, S) is False; compact to the left-padded layout.

        The newest entry is always kept, whatever `mask` says.
        """
        mask = mask & self.valid
        mask[..., -1] = True
        kept = int(mask.sum(-1).max())
        if kept == self.length and bool(mask.all()):
            return
        # A stable sort of the 0/1 mask puts dropped entries first and kept ones last, each group in
        # slot (= position) order; the last `kept` slots are the kept entries, left-padded.
        order = torch.sort(mask.to(torch.int8), dim=-1, stable=True).indices[..., -kept:]  # (B, Hk, kept)
        self.valid = mask.gather(-1, order)
        self.pos = self.pos.gather(-1, order)
        self.k = _gather_entries(self.k, order)
        self.v = _gather_entries(self.v, order)
        self.extra = {name: _gather_entries(buf, order) for name, buf in self.extra.items()}

    def kept_fraction(self) -> float:
        """Entries held / tokens seen, mean over rows (1.0 before any token): a row holds the
        entries of its longest KV head, as the reference counts its cache (`slots`)."""
        if self.valid is None or self.seen == 0:
            return 1.0
        return float(self.slots().float().mean()) / self.seen

    def cache_use(self) -> dict[str, float]:
        """The cache through time, as shares of the full cache's: `kv_kept` now (`kept_fraction`),
        `kv_kept_mean` = the slots each token saw summed over the tokens / the same sum for the
        full cache (seen (seen + 1) / 2), `kv_peak` = the most slots ever held / tokens seen."""
        if not self.seen:
            return {"kv_kept": 1.0, "kv_kept_mean": 1.0, "kv_peak": 1.0}
        full = self.seen * (self.seen + 1) / 2
        return {"kv_kept": self.kept_fraction(), "kv_kept_mean": float(self.slot_sum.mean()) / full,
                "kv_peak": float(self.slot_peak.mean()) / self.seen}


def _gather_entries(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, Hk, S, ...) at slots `order` (B, Hk, S') along dim 2."""
    index = order.view(*order.shape, *([1] * (x.ndim - 3))).expand(*order.shape, *x.shape[3:])
    return x.gather(2, index)


def attend_with_weights(
    q: torch.Tensor, q_pos: torch.Tensor, cache: EvictingCache
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention of q (B, Hq, t, D) at positions `q_pos` (t,) over `cache`.

    A query sees the valid cached entries at positions up to its own. Scores, softmax and the
    weighted sum run in float32 (the weights feed the policies); the output is cast to q's dtype.

    Returns:
        (out (B, Hq, t, D), weights (B, Hk, t, S)): the attention output and the float32 attention
        weights averaged over the G query heads of each KV head (as the NAMM reference does for GQA).
    """
    b, hq, t, d = q.shape
    hk, s = cache.k.shape[1], cache.length
    g = hq // hk
    k, v = cache.k.float(), cache.v.float()  # (B, Hk, S, D)
    qf = q.float().view(b, hk, g, t, d) * d**-0.5  # (B, Hk, G, t, D)
    rows = max(1, _SCORE_BLOCK // max(1, b * hq * s))
    outs, weights = [], []
    for r in range(0, t, rows):
        scores = torch.einsum("bhgtd,bhsd->bhgts", qf[:, :, :, r : r + rows], k)  # (B, Hk, G, t', S)
        scores.masked_fill_(~_visible(cache, q_pos[r : r + rows]), float("-inf"))
        w = torch.softmax(scores, dim=-1)  # (B, Hk, G, t', S)
        outs.append(torch.einsum("bhgts,bhsd->bhgtd", w, v))  # (B, Hk, G, t', D)
        weights.append(w.mean(dim=2))  # (B, Hk, t', S)
    out = torch.cat(outs, dim=3).reshape(b, hq, t, d)  # (B, Hq, t, D): query head = kv head * G + g
    return out.to(q.dtype), torch.cat(weights, dim=2)


def _visible(cache: EvictingCache, q_pos: torch.Tensor) -> torch.Tensor:
    """(B, Hk, 1, t, S) bool: valid entries at positions up to each query's (causal over positions)."""
    seen = cache.pos[:, :, None, None, :] <= q_pos.view(1, 1, 1, -1, 1)
    return seen & cache.valid[:, :, None, None, :]


def attend(q: torch.Tensor, q_pos: torch.Tensor, cache: EvictingCache) -> torch.Tensor:
    """`attend_with_weights` without the weights, through SDPA (for policies that do not read them)."""
    b, hq, t, d = q.shape
    hk = cache.k.shape[1]
    mask = _visible(cache, q_pos).expand(b, hk, hq // hk, t, cache.length).reshape(b, hq, t, cache.length)
    return F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask, enable_gqa=hq != hk)


class EvictingAttention(nn.Module):
    """Base of the evicting kinds: blocks at `update_every` boundaries, attention with weights.

    Subclasses say what they gather (`observe`) and what they keep (`select`); this class does
    the rest. Without `ctx.state` (a plain forward) each call uses a fresh cache of its own, so
    `model(ids)` gives the same logits as feeding `ids` through a state.
    """

    update_every: int
    needs_weights = True  # False: `observe` is never called and attention runs through SDPA

    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def observe(self, cache: EvictingCache, weights: torch.Tensor) -> None:
        """Record what the policy needs from one block's attention weights (B, Hk, t, S)."""

    def select(self, cache: EvictingCache) -> torch.Tensor | None:
        """The keep mask (B, Hk, S) at an update, or None to keep everything."""
        raise NotImplementedError

    def forward(self, q, k, v, ctx):
        if ctx.cu_seqlens is not None and ctx.cu_seqlens.numel() > q.shape[0] + 1:
            raise LongcptError(
                f"attention kind {type(self).__name__}: packed batches of several documents are not supported "
                "(an inference-time memory reads one sequence per row)"
            )
        q, k = ctx.rotate(q, k)
        positions = ctx.position_ids[0]  # (T,) rows share positions (longcpt.model.generation)
        cache = EvictingCache() if ctx.state is None else ctx.state.setdefault(self.layer_idx, EvictingCache())
        outs, start, t = [], 0, q.shape[2]
        while start < t:
            first = int(positions[start])
            end = min(t, start + self.update_every - first % self.update_every)
            cache.append(k[:, :, start:end], v[:, :, start:end], positions[start:end])
            if self.needs_weights:
                out, weights = attend_with_weights(q[:, :, start:end], positions[start:end], cache)
                self.observe(cache, weights)
            else:
                out = attend(q[:, :, start:end], positions[start:end], cache)
            outs.append(out)
            if (int(positions[end - 1]) + 1) % self.update_every == 0:
                mask = self.select(cache)
                if mask is not None:
                    cache.keep(mask)
            start = end
        return torch.cat(outs, dim=2)  # (B, Hq, T, D)


CACHE_SIZE = Option(None, POSITIVE_INT, "tokens kept after each eviction (required)")
UPDATE_EVERY = Option(512, POSITIVE_INT, "tokens between evictions (NAMM's schedule; 1 = every token, as in the papers)")


def _h2o_problems(options: dict) -> list[str]:
    recent = options["recent"]
    if recent is not None and recent >= options["cache_size"]:
        return [f"recent={recent} must be below cache_size={options['cache_size']} (room for heavy hitters)"]
    return []


@register(
    "h2o",
    options={
        "cache_size": CACHE_SIZE,
        "recent": Option(None, optional(POSITIVE_INT), "newest tokens always kept (default: half of cache_size)"),
        "update_every": UPDATE_EVERY,
    },
    trainable=False,
    inference_memory=True,
    check=_h2o_problems,
    hooks=KindHooks(telemetry=("kept_fraction", "cache_use")),
)
class H2OAttention(EvictingAttention):
    """Heavy-hitter oracle: the newest tokens plus those with the most attention received so far."""

    SCORE = "h2o_score"

    def __init__(self, args, layer_idx: int):
        super().__init__(args, layer_idx)
        opts = args.attention_options
        self.cache_size, self.update_every = opts["cache_size"], opts["update_every"]
        self.recent = opts["recent"] if opts["recent"] is not None else self.cache_size // 2

    def observe(self, cache: EvictingCache, weights: torch.Tensor) -> None:
        received = weights.sum(dim=2)  # (B, Hk, S)
        if self.SCORE not in cache.extra:
            cache.extra[self.SCORE] = torch.zeros_like(received)
        cache.extra[self.SCORE] += received

    def select(self, cache: EvictingCache) -> torch.Tensor | None:
        if int(cache.valid.sum(-1).max()) <= self.cache_size:
            return None
        score = cache.extra[self.SCORE].masked_fill(~cache.valid, float("-inf"))  # (B, Hk, S)
        if self.recent:
            newest = cache.pos.masked_fill(~cache.valid, -1).amax(-1, keepdim=True)  # (B, Hk, 1)
            score = score.masked_fill(cache.pos > newest - self.recent, float("inf"))
        top = score.topk(self.cache_size, dim=-1).indices  # (B, Hk, cache_size)
        return torch.zeros_like(cache.valid).scatter_(-1, top, True)


def _streaming_problems(options: dict) -> list[str]:
    if options["sinks"] >= options["cache_size"]:
        return [f"sinks={options['sinks']} must be below cache_size={options['cache_size']} (room for the window)"]
    return []


@register(
    "streaming",
    options={
        "cache_size": CACHE_SIZE,
        "sinks": Option(4, POSITIVE_INT, "first tokens always kept (attention sinks)"),
        "update_every": UPDATE_EVERY,
    },
    trainable=False,
    inference_memory=True,
    check=_streaming_problems,
    hooks=KindHooks(telemetry=("kept_fraction", "cache_use")),
)
class StreamingAttention(EvictingAttention):
    """StreamingLLM: attention sinks plus a window of the newest tokens."""

    needs_weights = False

    def __init__(self, args, layer_idx: int):
        super().__init__(args, layer_idx)
        opts = args.attention_options
        self.cache_size, self.sinks, self.update_every = opts["cache_size"], opts["sinks"], opts["update_every"]

    def select(self, cache: EvictingCache) -> torch.Tensor | None:
        n = cache.valid.sum(-1, keepdim=True)  # (B, Hk, 1)
        if int(n.max()) <= self.cache_size:
            return None
        rank = cache.valid.cumsum(-1) - 1  # (B, Hk, S) index among the valid entries, oldest = 0
        window = self.cache_size - self.sinks
        return cache.valid & ((rank < self.sinks) | (rank >= n - window))
