"""Infini-attention's core (Munkhdalai et al. 2024, arXiv 2404.07143): memory, segments, the attention module.

Every layer keeps, per KV head, a compressive memory M (D x D) and a normalizer z (D), both
float32. For each segment of `segment_len` = N tokens (paper section 3.1, eqs. 7-10):

    sq, sk = elu(q) + 1, elu(k) + 1                    q, k BEFORE RoPE, in float32
    A_mem  = (sq @ M) / (sq @ z)                       read what earlier segments wrote
    A_dot  = causal softmax attention inside the segment, RoPE at local positions 0 .. N-1
    A      = sigmoid(gate) * A_mem + (1 - sigmoid(gate)) * A_dot      one gate per query head
    then write (after the read, so a segment never reads itself):
           linear:  M += sk^T v
           delta:   M += sk^T (v - (sk @ M) / (sk @ z))
           z += sum over the segment's tokens of sk

Choices, with their sources (docs/infini.md has the longer story):
  * Memory reads and writes use the un-rotated q/k (paper section 4.1: "PEs were applied to the QK
    vectors only after the compressive memory reading and update"; Beomi/InfiniTransformer#15).
  * M and z are float32 whatever the model dtype, with autocast off: bf16 sums overflow to inf/NaN
    within a couple of segments (Beomi/InfiniTransformer#21).
  * GQA: one memory per KV head, read by its group of query heads (as nanotron and Beomi do).
  * Before anything is written the read is skipped (A_mem = 0); afterwards the denominator is
    floored at `DENOMINATOR_EPS` (z is a sum of positive terms, so only a fresh stream hits it).
  * The gate is `gate` (Hq,), initialised to `gate_init` (default -2.5, sigmoid = 0.08): the
    pretrained attention is barely disturbed at the start of continual pretraining, yet the gate
    gets a usable gradient (init 0 halves the pretrained output, -100 freezes the gate; HF blog
    "A failed experiment: Infini-Attention"). The trainer gives it its own optimizer group.

Segments and documents. A token at position p of its document sits in segment p // N at local
position p % N, so `position_ids` (restarting at 0 in every document: the `document` rule of `longcpt.batch`) define the
segment grid, and `cu_seqlens` (or the rows, when None) define the documents. Memory never crosses
a document boundary: every document is its own *stream* with its own M and z.

    row:        | doc 0 (5 tokens)      | doc 1 (3) |      N = 2
    positions:    0 1 | 2 3 | 4           0 1 | 2
    pieces:       s0    s1    s2          s0    s1         step j handles piece j of every doc

One call processes its pieces step by step (piece j of every document in step j); pieces of one
step with equal local offset and length are batched into one SDPA call (`plan_segments`, computed
once per forward and shared by all layers through `ctx.cache`).

State across calls (streaming inference, segment-major training): with `ctx.state` given, the
documents of the call, in order, continue streams 0 .. S-1 of `ctx.state[layer_idx]`, an
`InfiniMemory`. A segment left unfinished at the end of a call keeps its un-rotated keys and its
values there (fewer than N tokens), and the next call resumes it; its memory write happens when
it completes. Hence any chunking of a stream gives the same result as one call over it, with a
state whose size is bounded by N, however long the stream.

Shapes: B batch, T tokens per row, Hq query heads, Hk KV heads, G = Hq / Hk, D head dim,
N segment length, S streams (documents), P pieces in a group, L piece length, o the local
position of a piece's first token (its offset inside its segment).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longcpt.batch import document_spans
from longcpt.errors import LongcptError
from longcpt.model.attention import FINITE_NUMBER, POSITIVE_INT, Option, one_of
from longcpt.model.attention.full import causal_attention, offset_causal_mask
from longcpt.model.rope import apply_rotary

OPTIONS = {
    "segment_len": Option(2048, POSITIVE_INT, "tokens per segment N (memory is written every N tokens)"),
    "memory_update": Option("delta", one_of("linear", "delta"), "memory write rule (paper eq. 8 or 9)"),
    "bptt_segments": Option(2, POSITIVE_INT, "segments in one truncated-backprop window (>= 2 trains the write)"),
    # sigmoid(-2.5) = 0.08: memory starts small but trainable (see the module docstring).
    "gate_init": Option(-2.5, FINITE_NUMBER, "initial gate logit of every head"),
}
# Floor of the read denominator sq . z (lucidrains clamps at 1e-10, jlamprou at 1e-8; anything far
# below the smallest real z works: z grows by at least N * min(sk) per segment).
DENOMINATOR_EPS = 1e-6
_PLAN_KEY = "infini_plan"
_ROPE_KEY = "infini_rope"


# ----------------------------------------------------------------------------------------------
# Documents and segments: pure functions of positions and cu_seqlens, computed once per forward.


@dataclass(frozen=True)
class PieceGroup:
    """Pieces attended in one batched call: one per stream, same offset and length.

    Attributes:
        streams: stream (document) index of each of the P pieces.
        index: (P, L) flat token index (over B*T) of each piece's tokens.
        offset: local position o of the first token of every piece.
        length: L.
    """

    streams: tuple[int, ...]
    index: torch.Tensor
    offset: int
    length: int


@dataclass(frozen=True)
class SegmentPlan:
    """How one call walks its documents segment by segment.

    Attributes:
        n_streams: number of documents S.
        steps: step j holds the groups of every document's j-th piece.
        inverse: (B*T,) where each flat token sits in the concatenated group outputs, or None when
            that order is already the flat order.
    """

    n_streams: int
    steps: list[list[PieceGroup]]
    inverse: torch.Tensor | None


def plan_segments(position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None, segment_len: int) -> SegmentPlan:
    """Cut every document into pieces at segment boundaries and group them (see module docstring).

    Example: N=4, one row of 7 tokens, positions 2..8 (a stream resumed at position 2):
    pieces [2,3] (offset 2, step 0), [4..7] (offset 0, step 1), [8] (offset 0, step 2).

    Args:
        position_ids: (B, T) position of each token in its document (stream).
        cu_seqlens: (S+1,) document starts over B*T, or None for one document per row.
        segment_len: N.

    Raises:
        LongcptError: positions that do not advance by one inside a document, or bad cu_seqlens.
    """
    b, t = position_ids.shape
    spans = document_spans(cu_seqlens, b, t)
    flat_pos = position_ids.reshape(-1)
    device = flat_pos.device
    # Inside a document every position is its predecessor's plus one (one vectorised check).
    is_start = torch.zeros(b * t, dtype=torch.bool, device=device)
    is_start[[s.start for s in spans]] = True
    advances = (flat_pos[1:] - flat_pos[:-1] == 1) | is_start[1:]
    if not bool(advances.all()):
        bad = int((~advances).nonzero()[0, 0]) + 1
        raise LongcptError(
            f"infini: position_ids must increase by one inside each document; token {bad} (row {bad // t}) has "
            f"position {int(flat_pos[bad])} after {int(flat_pos[bad - 1])}. Pass positions that restart at 0 in "
            "every document (or absolute stream positions when streaming with a state)."
        )
    firsts = flat_pos[[s.start for s in spans]].tolist()

    # step -> (offset, length) -> [(stream, flat start)], insertion-ordered (streams ascending).
    steps: list[dict[tuple[int, int], list[tuple[int, int]]]] = []
    for stream, ((start, length), first) in enumerate(zip(spans, firsts)):
        offset, done, step = first % segment_len, 0, 0
        while done < length:
            piece = min(segment_len - offset, length - done)
            if step == len(steps):
                steps.append({})
            steps[step].setdefault((offset, piece), []).append((stream, start + done))
            done, offset, step = done + piece, 0, step + 1

    plan_steps, order = [], []
    for groups in steps:
        plan_steps.append([])
        for (offset, length), pieces in groups.items():
            starts = torch.tensor([s for _, s in pieces], device=device)
            index = starts[:, None] + torch.arange(length, device=device)  # (P, L)
            plan_steps[-1].append(PieceGroup(tuple(st for st, _ in pieces), index, offset, length))
            order.append(index.reshape(-1))
    order_t = torch.cat(order) if order else torch.zeros(0, dtype=torch.long, device=device)
    identity = torch.arange(b * t, device=device)
    inverse = None
    if not torch.equal(order_t, identity):
        inverse = torch.empty_like(order_t)
        inverse[order_t] = identity
    return SegmentPlan(len(spans), plan_steps, inverse)


# ----------------------------------------------------------------------------------------------
# Memory: what a layer carries across segments and calls, and the two memory operations.


@dataclass
class InfiniMemory:
    """One layer's state for S streams, kept in `ctx.state[layer_idx]` between calls.

    Attributes:
        memory: (S, Hk, D, D) float32 M, or None while no stream has written anything.
        norm: (S, Hk, D) float32 z, or None likewise.
        keys: per stream, the un-rotated keys (Hk, n, D) of its unfinished segment (None: n = 0).
        values: per stream, the values (Hk, n, D) of its unfinished segment.
    """

    memory: torch.Tensor | None
    norm: torch.Tensor | None
    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]

    @classmethod
    def empty(cls, streams: int) -> InfiniMemory:
        return cls(None, None, [None] * streams, [None] * streams)

    def pending(self, stream: int) -> int:
        """Number of tokens of the stream's unfinished segment."""
        keys = self.keys[stream]
        return 0 if keys is None else keys.shape[1]

    def nbytes(self) -> int:
        """Bytes held (bounded: M, z and fewer than N cached tokens per stream)."""
        tensors = [self.memory, self.norm, *self.keys, *self.values]
        return sum(x.numel() * x.element_size() for x in tensors if x is not None)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = ELU(x) + 1 in float32: positive, so the normalizer z stays positive (eq. 7)."""
    return F.elu(x.float()) + 1.0


def memory_read(sq: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """A_mem = (sq @ M) / (sq @ z) for sq (P, Hq, L, D), M (P, Hk, D, D), z (P, Hk, D).

    Query head h reads KV head h // G (transformers' `repeat_kv` grouping), via broadcasting
    instead of a repeated copy of M.

    Returns:
        (P, Hq, L, D) float32.
    """
    p, hq, length, d = sq.shape
    hk = memory.shape[1]
    sq = sq.view(p, hk, hq // hk, length, d)  # (P, Hk, G, L, D)
    numerator = sq @ memory[:, :, None]  # (P, Hk, G, L, D)
    denominator = sq @ norm[:, :, None, :, None]  # (P, Hk, G, L, 1)
    return (numerator / denominator.clamp(min=DENOMINATOR_EPS)).view(p, hq, length, d)


def memory_write(
    sk: torch.Tensor, v: torch.Tensor, memory: torch.Tensor | None, norm: torch.Tensor | None, delta: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment's write: sk, v (P, Hk, N, D) float32 into M (P, Hk, D, D), z (P, Hk, D).

    `delta` subtracts what the memory already returns for these keys (eq. 9), so storing the same
    association twice does not double it; z is updated as in the linear rule (paper section 3.1).
    None memory means nothing written yet (then both rules add sk^T v).

    Returns:
        The new (memory, norm).
    """
    if memory is None:
        return sk.transpose(-1, -2) @ v, sk.sum(dim=2)
    if delta:
        retrieved = (sk @ memory) / (sk @ norm[..., None]).clamp(min=DENOMINATOR_EPS)  # (P, Hk, N, D)
        v = v - retrieved
    return memory + sk.transpose(-1, -2) @ v, norm + sk.sum(dim=2)


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, precision: str
) -> torch.Tensor:
    """Causal softmax attention inside a segment, RoPE at local positions.

    Args:
        q: (P, Hq, L, D) un-rotated queries at local positions o .. o+L-1 (o = k's length - L).
        k, v: (P, Hk, o+L, D) un-rotated keys and values at local positions 0 .. o+L-1.
        cos, sin: (1, >= o+L, D) float32 tables for local positions 0, 1, ...
        precision: the model's rope precision ("fp32" | "model").

    Returns:
        (P, Hq, L, D).
    """
    length, total = q.shape[2], k.shape[2]
    offset = total - length
    if offset == 0:
        q, k = apply_rotary(q, k, cos[:, :length], sin[:, :length], precision)
        return causal_attention(q, k, v)
    # Queries and keys sit at different positions here; `apply_rotary` rotates both of its inputs
    # with one table, so each is rotated on its own (its partner is an empty slice, free).
    q, _ = apply_rotary(q, q[:, :0], cos[:, offset:total], sin[:, offset:total], precision)
    _, k = apply_rotary(k[:, :0], k, cos[:, :total], sin[:, :total], precision)
    mask = offset_causal_mask(length, total, q.device) if length > 1 else None  # (L, o+L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------------------------
# The attention kind.


class InfiniAttention(nn.Module):
    """Infini-attention core: `forward(q, k, v, ctx) -> (B, Hq, T, D)` (see the module docstring).

    Args:
        args: `ModelArgs`; `args.attention_options` may set segment_len, memory_update,
            bptt_segments and gate_init (`OPTIONS`), resolved by the registry.
        layer_idx: key of this layer's entry in `ctx.state`.

    Attributes:
        gate: (Hq,) per-head gate logit beta; sigmoid(beta) is the weight of the memory read.
    """

    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.options = args.attention_options  # resolved: every key of OPTIONS
        self.segment_len = self.options["segment_len"]
        self.bptt_segments = self.options["bptt_segments"]
        self.delta = self.options["memory_update"] == "delta"
        if args.num_attention_heads % args.num_key_value_heads:
            raise LongcptError(
                f"num_attention_heads={args.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={args.num_key_value_heads}"
            )
        self.gate = nn.Parameter(torch.empty(args.num_attention_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every gate to `gate_init` (called for checkpoints that have no gates)."""
        with torch.no_grad():
            self.gate.fill_(self.options["gate_init"])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        b, hq, t, d = q.shape
        hk = k.shape[1]
        plan = ctx.cache.get(_PLAN_KEY)
        if plan is None:
            plan = ctx.cache[_PLAN_KEY] = plan_segments(ctx.position_ids, ctx.cu_seqlens, self.segment_len)
        if _ROPE_KEY not in ctx.cache:  # local positions 0 .. N-1, shared by all layers
            local = torch.arange(self.segment_len, device=q.device)[None]  # (1, N)
            ctx.cache[_ROPE_KEY] = ctx.rope(local)  # cos, sin (1, N, D) float32
        cos, sin = ctx.cache[_ROPE_KEY]
        state = self._read_state(ctx, plan.n_streams)

        qf = q.transpose(1, 2).reshape(b * t, hq, d)  # (B*T, Hq, D) token-major
        kf = k.transpose(1, 2).reshape(b * t, hk, d)  # (B*T, Hk, D)
        vf = v.transpose(1, 2).reshape(b * t, hk, d)  # (B*T, Hk, D)
        outputs = []
        for step in plan.steps:
            for group in step:
                qg = qf[group.index].transpose(1, 2)  # (P, L, Hq, D) -> (P, Hq, L, D)
                kg = kf[group.index].transpose(1, 2)  # (P, Hk, L, D)
                vg = vf[group.index].transpose(1, 2)  # (P, Hk, L, D)
                y, state = self._attend(qg, kg, vg, group, state, cos, sin, ctx.rope.precision)
                outputs.append(y.transpose(1, 2).reshape(-1, hq, d))  # (P*L, Hq, D)
        y = torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # (B*T, Hq, D) in group order
        if plan.inverse is not None:
            y = y[plan.inverse]  # back to flat token order
        if ctx.state is not None:
            ctx.state[self.layer_idx] = state
        return y.view(b, t, hq, d).transpose(1, 2)  # (B, Hq, T, D)

    def _read_state(self, ctx, streams: int) -> InfiniMemory:
        """A fresh copy of this layer's state (never mutated: activation checkpointing re-runs us)."""
        if ctx.state is None or self.layer_idx not in ctx.state:
            return InfiniMemory.empty(streams)
        old = ctx.state[self.layer_idx]
        if len(old.keys) != streams:
            raise LongcptError(
                f"infini: the state holds {len(old.keys)} streams but this call has {streams} documents; "
                "continue a state with the same rows (or documents, in order) it was built with"
            )
        return dataclasses.replace(old, keys=list(old.keys), values=list(old.values))

    def _attend(self, q, k, v, group: PieceGroup, state: InfiniMemory, cos, sin, precision):
        """One group: local attention, memory read, and the write when the segments complete."""
        streams = list(group.streams)
        for s in streams:
            if state.pending(s) != group.offset:
                raise LongcptError(
                    f"infini: stream {s} resumes at local position {group.offset} of its segment but the state "
                    f"holds {state.pending(s)} tokens of it; pass absolute position_ids and the state of the "
                    "previous call (a document cannot start in the middle of a segment without one)"
                )
        if group.offset:  # resume the unfinished segments kept in the state
            k = torch.cat([torch.stack([state.keys[s] for s in streams]), k], dim=2)  # (P, Hk, o+L, D)
            v = torch.cat([torch.stack([state.values[s] for s in streams]), v], dim=2)  # (P, Hk, o+L, D)
        a_dot = local_attention(q, k, v, cos, sin, precision)  # (P, Hq, L, D)

        everyone = streams == list(range(len(state.keys)))
        index = None if everyone else torch.tensor(streams, device=q.device)
        memory, norm = state.memory, state.norm
        if memory is not None and not everyone:
            memory, norm = memory[index], norm[index]  # (P, Hk, D, D), (P, Hk, D)
        gate = torch.sigmoid(self.gate.float()).view(1, -1, 1, 1)  # (1, Hq, 1, 1)
        with torch.autocast(device_type=q.device.type, enabled=False):  # memory math stays float32
            y = (1 - gate) * a_dot.float()
            if memory is not None:
                y = y + gate * memory_read(feature_map(q), memory, norm)
            if group.offset + group.length == self.segment_len:  # segments complete: write them
                memory, norm = memory_write(feature_map(k), v.float(), memory, norm, self.delta)
                state = self._store(state, index, memory, norm)
                for s in streams:
                    state.keys[s] = state.values[s] = None
            else:  # keep the unfinished segments for the next call
                for i, s in enumerate(streams):
                    state.keys[s], state.values[s] = k[i], v[i]
        return y.to(q.dtype), state

    @staticmethod
    def _store(state: InfiniMemory, index, memory, norm) -> InfiniMemory:
        """State with the given streams' memory replaced (out of place, so autograd sees it)."""
        if index is None:
            return dataclasses.replace(state, memory=memory, norm=norm)
        if state.memory is None:  # first write of this call: the other streams hold nothing yet
            s = len(state.keys)
            state = dataclasses.replace(
                state, memory=memory.new_zeros(s, *memory.shape[1:]), norm=norm.new_zeros(s, *norm.shape[1:])
            )
        return dataclasses.replace(
            state, memory=state.memory.index_copy(0, index, memory), norm=state.norm.index_copy(0, index, norm)
        )
