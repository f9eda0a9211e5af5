"""The SDPA kernels of `intra_doc` and `anchor`: documents bucketed by length; on CPU, chunked.

On CPU (`document_flash`): torch's CPU flash-attention kernel (what SDPA runs on CPU) tiles keys in blocks of 512 and, under
`is_causal`, skips only the blocks that lie wholly above the diagonal. A causal document of up to
512 tokens therefore costs its whole L x L square, twice its triangle: with documents of a few
hundred tokens, one `is_causal` call per document (or per bucket of documents) does twice the
work the mask allows. This kernel cuts each document into query chunks of about `CHUNK` tokens;
chunk [a, b) attends to keys [0, b) under a bottom-right causal mask, so a document of L tokens
costs about L^2/2 + L*CHUNK/2 score entries instead of L^2 (docs/benchmarks.md measures it):

    keys ->      0 1 2 3 4 5 6 7        a document of 8 tokens in three chunks; the kernel
    chunk 0   0  x . .                  computes every entry shown (x = attended, . = masked)
              1  x x .                  and none of the blank ones:
              2  x x x                    chunk 0 = [0, 3): an `is_causal` call, keys [0, 3)
    chunk 1   3  x x x x . .              chunk 1 = [3, 6): keys [0, 6), a (3, 6) mask
              4  x x x x x .              chunk 2 = [6, 8): keys [0, 8), a (2, 8) mask
              5  x x x x x x
    chunk 2   6  x x x x x x x .
              7  x x x x x x x x

Documents of similar length are attended together: a bucket of n documents is right-padded to
its longest length L and each of its chunks is one call on n rows. Padding is exact: under a
causal mask a real token never sees the padding after it, and padded slots repeat their document's
last token so every value stays finite; their gradients are exactly zero (their output gradient
is), so dropping them is exact too.

The kernel is the custom op `longcpt::document_flash` (with its backward op), so `torch.compile`
sees one opaque call whose output shape is its input's: no graph break, and no recompilation when
the document layout changes (the layout is read from `cu_seqlens` inside the op). Its backward
calls the CPU flash backward chunk by chunk with each chunk's saved output and log-sum-exp.

On other devices (`bucketed_sdpa`, the `sdpa` fallback on GPUs without a varlen kernel), one
`is_causal` SDPA call per bucket: the GPU kernels skip masked tiles of 64-128 tokens themselves.

Shapes: B batch, T tokens per row, Hq query heads, Hk KV heads, D head dim, P padded tokens of
all buckets, n documents in a bucket, L their padded length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longcpt.batch import Span, document_spans

# Query chunk length, measured (benchmarks/attention.py, 16K tokens / 32 documents, 8 query and 4
# KV heads of 32): 64 to 128 are within a few percent of each other, 96 the fastest; shorter
# chunks waste less of the diagonal but run the kernel on smaller tiles.
CHUNK = 96
# Longer documents are attended in one `is_causal` call: the kernel's own causal block skipping
# then wastes little (1.25x the triangle at 2K, 1.12x at 4K) and its larger tiles run faster.
CHUNKED_UP_TO = 2048
# Documents of at least this many tokens are attended alone, straight from the token-major
# tensors (no copy, no padding); shorter ones are bucketed, which costs a gather and a scatter of
# their rows but shares the fixed cost of a call (about 0.05 ms per chunk, forward and backward).
_ALONE_FROM = 96
# Bucketing of short documents: a document joins the current bucket (padded to its longest
# member) when padding wastes at most this share of its own attention cost ...
_MAX_PAD_WASTE = 0.3
# ... or when the padded work is smaller than the fixed cost of one more call: on CPU one flash
# fwd+bwd call costs about 0.1-0.2 ms, as much as a causal document of about 64 tokens.
_CALL_COST_TOKENS = 64

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True, eq=False)
class Bucket:
    """n documents of (padded) length L attended together, chunk by chunk.

    Either the n documents lie back to back from token `start` (a view of the token-major
    tensors: one document alone, or equal documents in a row, such as whole rows), or they are
    gathered into a padded copy.

    Attributes:
        chunks: the query chunks [a, b) that cover [0, L), in order.
        start: first token of the back-to-back documents, or None when gathered.
        gather: (n*L,) token of every padded slot (padding repeats its document's last token).
        slots, tokens: (R,) the slots holding real tokens and those tokens.
    """

    n: int
    length: int
    chunks: tuple[tuple[int, int], ...]
    start: int | None = None
    gather: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def _heads_first(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(self.n, self.length, *rows.shape[1:]).transpose(1, 2)  # (n, H, L, ...)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """This bucket's documents of a token-major (B*T, H, ...) tensor as (n, H, L, ...)."""
        if self.start is not None:
            return self._heads_first(x[self.start : self.start + self.n * self.length])
        return self._heads_first(x.index_select(0, self.gather))

    def read_zero_padded(self, x: torch.Tensor) -> torch.Tensor:
        """`read`, with zeros in the padding slots (for output gradients)."""
        if self.start is not None:
            return self.read(x)
        rows = x.new_zeros(self.n * self.length, *x.shape[1:]).index_copy_(0, self.slots, x.index_select(0, self.tokens))
        return self._heads_first(rows)

    def writable(self, x: torch.Tensor, fill: float | None = None) -> torch.Tensor:
        """Where results for `x`'s rows of this bucket go, (n, H, L, ...): a view of `x`, or a
        padded buffer (zero-filled when `fill` is 0) that `write_back` copies into `x`."""
        if self.start is not None:
            return self.read(x)
        shape = (self.n * self.length, *x.shape[1:])
        return self._heads_first(x.new_zeros(shape) if fill == 0 else x.new_empty(shape))

    def write_back(self, x: torch.Tensor, buffer: torch.Tensor) -> None:
        """Copy the real slots of a `writable` buffer (n, H, L, ...) into the token-major `x`."""
        if self.start is None:
            rows = buffer.transpose(1, 2).reshape(self.n * self.length, *x.shape[1:])  # (n*L, H, ...)
            x.index_copy_(0, self.tokens, rows.index_select(0, self.slots))


@dataclass(frozen=True, eq=False)
class ChunkPlan:
    """How the kernel visits the documents of one layout.

    Attributes:
        buckets: the buckets (every token in exactly one).
    """

    buckets: tuple[Bucket, ...]

    def gather_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) token of every slot of all buckets in order, and (B*T,) the slot of every token
        (for `bucketed_sdpa`, which gathers all buckets at once)."""
        device = next((bk.gather.device for bk in self.buckets if bk.gather is not None), None)
        gathers, slots, tokens, offset = [], [], [], 0
        for bk in self.buckets:
            size = bk.n * bk.length
            if bk.start is not None:
                span = torch.arange(bk.start, bk.start + size, device=device)
                gathers.append(span)
                slots.append(torch.arange(offset, offset + size, device=device))
                tokens.append(span)
            else:
                gathers.append(bk.gather)
                slots.append(offset + bk.slots)
                tokens.append(bk.tokens)
            offset += size
        row_of_token = torch.empty(sum(len(t) for t in tokens), dtype=torch.long, device=device)
        row_of_token[torch.cat(tokens)] = torch.cat(slots)
        return torch.cat(gathers), row_of_token


def chunk_bounds(length: int, chunk: int, whole: bool = False) -> tuple[tuple[int, int], ...]:
    """Query chunks [a, b) of about `chunk` tokens covering [0, length).

    One chunk (a plain causal call) for documents of at most 1.5 chunks, longer than
    `CHUNKED_UP_TO`, or when `whole` (every document is a whole row: exactly `full`'s call).
    """
    count = 1 if whole or length > CHUNKED_UP_TO else max(1, round(length / chunk))
    edges = [round(j * length / count) for j in range(count + 1)]
    return tuple(zip(edges[:-1], edges[1:]))


def _runs(spans: tuple[Span, ...]) -> list[list[int]]:
    """Maximal runs of back-to-back documents of equal length (indices into `spans`)."""
    runs: list[list[int]] = []
    for i, span in enumerate(spans):
        last = spans[runs[-1][-1]] if runs else None
        if last is not None and last.length == span.length and last.start + last.length == span.start:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _groups(spans: tuple[Span, ...], alone_from: int) -> list[list[int]]:
    """Documents (indices into `spans`) grouped into buckets.

    A run of back-to-back documents of at least `alone_from` tokens is a bucket of its own.
    Shorter documents, longest first, join the current bucket when padding to the bucket's length
    wastes little (`_MAX_PAD_WASTE`) or costs less than another call (`_CALL_COST_TOKENS`);
    equal lengths always share a bucket.
    """
    groups, short = [], []
    for run in _runs(spans):
        if spans[run[0]].length >= alone_from:
            groups.append(run)
        else:
            short.extend(run)
    short.sort(key=lambda i: (-spans[i].length, spans[i].start))
    first_short = len(groups)
    for i in short:
        n = spans[i].length
        if len(groups) > first_short:
            longest = spans[groups[-1][0]].length
            waste = longest * longest - n * n
            if waste <= _MAX_PAD_WASTE * n * n or waste <= _CALL_COST_TOKENS**2:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def _bucket(spans: list[Span], chunks: tuple[tuple[int, int], ...], device: torch.device) -> Bucket:
    """A bucket of `spans` (longest first): a view when they lie back to back with equal lengths."""
    length, count = spans[0].length, len(spans)
    back_to_back = all(s.length == length and s.start == spans[0].start + j * length for j, s in enumerate(spans))
    if back_to_back:
        return Bucket(count, length, chunks, start=spans[0].start)
    starts = torch.tensor([s.start for s in spans], device=device)
    lengths = torch.tensor([s.length for s in spans], device=device)
    steps = torch.arange(length, device=device)
    real = steps[None, :] < lengths[:, None]  # (n, L)
    gather = starts[:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)  # (n, L)
    slots = torch.arange(count * length, device=device).view(count, length)[real]
    return Bucket(count, length, chunks, gather=gather.reshape(-1), slots=slots, tokens=gather[real])


@functools.lru_cache(maxsize=32)
def _plan(spans: tuple[Span, ...], seq_len: int, device: torch.device, chunk: int, alone_from: int) -> ChunkPlan:
    """The buckets of one layout (kept: every layer and the backward reuse them)."""
    whole = all(s.length == seq_len for s in spans)
    buckets = []
    for group in _groups(spans, alone_from):
        members = [spans[i] for i in group]
        buckets.append(_bucket(members, chunk_bounds(members[0].length, chunk, whole), device))
    return ChunkPlan(tuple(buckets))


def chunk_plan(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> ChunkPlan:
    """Check `cu_seqlens` (`longcpt.batch.document_spans`) and plan the kernel's calls.

    Raises:
        LongcptError: `cu_seqlens` breaks the packed-batch contract.
    """
    spans = tuple(document_spans(cu_seqlens, batch, seq_len))
    return _plan(spans, seq_len, cu_seqlens.device, CHUNK, _ALONE_FROM)


@functools.lru_cache(maxsize=256)
def _chunk_mask(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows, cols) additive mask of the last `rows` queries over `cols` keys: 0 where query i
    (at position cols - rows + i) may attend, -inf after it. The CPU kernel wants the query's dtype."""
    allowed = torch.ones(rows, cols, dtype=torch.bool, device=device).tril(cols - rows)
    return torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def _mask(a: int, b: int, like: torch.Tensor) -> torch.Tensor | None:
    return None if a == 0 else _chunk_mask(b - a, b, like.dtype, like.device)


@functools.cache
def _native_gqa() -> bool:
    """Whether torch's CPU flash kernel takes fewer KV heads than query heads (torch 2.13 does;
    where it does not, the KV heads are repeated for it and their gradients summed back)."""
    q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        _FLASH(q, kv, kv, 0.0, True)
    except RuntimeError:
        return False
    return True


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"document_flash wants q (B*T, Hq, D), k/v (B*T, Hk, D); got {q.shape}, {k.shape}, {v.shape}")


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.shape[1] == k.shape[1] or _native_gqa():
        return k, v
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B*T, Hq, D)


@torch.library.custom_op("longcpt::document_flash", mutates_args=(), device_types="cpu")
def document_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each document of a packed batch, on CPU.

    Args:
        q: (B*T, Hq, D) rotated queries, token-major; k, v: (B*T, Hk, D).
        cu_seqlens: (N+1,) document starts over the B*T tokens (`longcpt.batch`).
        seq_len: T.

    Returns:
        The output (B*T, Hq, D) and the log-sum-exp of every query's scores (B*T, Hq) (float32,
        float64 for float64 inputs), which the backward reads.

    Raises:
        LongcptError: `cu_seqlens` breaks the packed-batch contract.
    """
    _check_inputs(q, k, v)
    plan = chunk_plan(cu_seqlens, q.shape[0] // seq_len, seq_len)
    kr, vr = _repeat_kv(q, k, v)
    out = torch.empty_like(q)  # (B*T, Hq, D)
    lse = q.new_empty(q.shape[:2], dtype=_lse_dtype(q.dtype))  # (B*T, Hq)
    for bucket in plan.buckets:
        qb, kb, vb = bucket.read(q), bucket.read(kr), bucket.read(vr)  # (n, H, L, D)
        ob, lb = bucket.writable(out), bucket.writable(lse)  # (n, Hq, L, D), (n, Hq, L)
        for a, b in bucket.chunks:
            o, m = _FLASH(qb[:, :, a:b], kb[:, :, :b], vb[:, :, :b], 0.0, a == 0, attn_mask=_mask(a, b, q))
            ob[:, :, a:b] = o  # (n, Hq, b-a, D)
            lb[:, :, a:b] = m  # (n, Hq, b-a)
        bucket.write_back(out, ob)
        bucket.write_back(lse, lb)
    return out, lse


@document_flash.register_fake
def _document_flash_shapes(q, k, v, cu_seqlens, seq_len):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("longcpt::document_flash_backward", mutates_args=(), device_types="cpu")
def document_flash_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `document_flash` for q, k and v, chunk by chunk.

    Each chunk's backward gets the chunk's own output and log-sum-exp (the softmax it normalised)
    and adds its key/value gradients over the keys [0, b) it saw.
    """
    plan = chunk_plan(cu_seqlens, q.shape[0] // seq_len, seq_len)
    kr, vr = _repeat_kv(q, k, v)
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(kr), torch.zeros_like(vr)
    for bucket in plan.buckets:
        qb, kb, vb = bucket.read(q), bucket.read(kr), bucket.read(vr)  # (n, H, L, D)
        ob, lb = bucket.read(out), bucket.read(lse)  # padding: its document's last token, finite
        gb = bucket.read_zero_padded(grad_out)  # (n, Hq, L, D), 0 in the padding
        dqb, dkb, dvb = bucket.writable(dq), bucket.writable(dk, fill=0), bucket.writable(dv, fill=0)
        for a, b in bucket.chunks:
            dq_c, dk_c, dv_c = _FLASH_BACKWARD(
                gb[:, :, a:b], qb[:, :, a:b], kb[:, :, :b], vb[:, :, :b], ob[:, :, a:b], lb[:, :, a:b],
                0.0, a == 0, attn_mask=_mask(a, b, q),
            )
            dqb[:, :, a:b] = dq_c  # (n, Hq, b-a, D)
            dkb[:, :, :b] += dk_c  # (n, H, b, D)
            dvb[:, :, :b] += dv_c
        for x, buffer in ((dq, dqb), (dk, dkb), (dv, dvb)):
            bucket.write_back(x, buffer)
    if dk.shape[1] != k.shape[1]:  # KV heads repeated for the kernel: sum each group back
        dk = dk.view(dk.shape[0], k.shape[1], -1, dk.shape[2]).sum(2)  # (B*T, Hk, D)
        dv = dv.view(dv.shape[0], v.shape[1], -1, dv.shape[2]).sum(2)
    return dq, dk, dv


@document_flash_backward.register_fake
def _document_flash_backward_shapes(grad_out, q, k, v, out, lse, cu_seqlens, seq_len):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, seq_len = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.seq_len = seq_len


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = document_flash_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.seq_len)
    return dq, dk, dv, None, None


document_flash.register_autograd(_backward, setup_context=_save)


def cpu_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Causal attention within each document, on CPU: (B, Hq, T, D) layout in and out.

    Args:
        q: (B, Hq, T, D) rotated queries; k, v: (B, Hk, T, D).
        cu_seqlens: (N+1,) document starts over the flattened B*T tokens.

    Returns:
        (B, Hq, T, D).
    """
    b, hq, t, d = q.shape

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # (B*T, H, D)

    out, _ = document_flash(tokens(q), tokens(k), tokens(v), cu_seqlens, t)  # (B*T, Hq, D)
    return out.view(b, t, hq, d).transpose(1, 2)  # (B, Hq, T, D)


def bucketed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """One `is_causal` SDPA call per bucket (any device, autograd by torch): q (B*T, Hq, D),
    k/v (B*T, Hk, D) -> (B*T, Hq, D).

    One gather brings every bucket's padded documents together and one gather puts the outputs
    back; the buckets are `split` views, whose backward is a single concatenation (per-bucket
    slicing would allocate a full-size zero gradient per bucket).
    """
    gather, row_of_token = plan.gather_all()
    sizes = [bucket.n * bucket.length for bucket in plan.buckets]
    gqa = q.shape[1] != k.shape[1]

    def buckets(x: torch.Tensor) -> list[torch.Tensor]:
        parts = x.index_select(0, gather).split(sizes)  # (n*L, H, D) each
        return [part.view(bk.n, bk.length, *x.shape[1:]).transpose(1, 2) for part, bk in zip(parts, plan.buckets)]

    outs = [
        F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=gqa)  # (n, Hq, L, D)
        .transpose(1, 2).reshape(-1, *q.shape[1:])  # (n*L, Hq, D)
        for qb, kb, vb in zip(buckets(q), buckets(k), buckets(v))
    ]
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, row_of_token)
