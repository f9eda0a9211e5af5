"""The SDPA kernels of `intra_doc` and `anchor`: documents bucketed by length; on CPU, chunked.

On CPU (`document_flash`): torch's CPU flash-attention kernel (what SDPA runs on CPU) tiles keys
in blocks of 512 and, under `is_causal`, skips only the blocks that lie wholly above the
diagonal. A causal document of up to 512 tokens therefore costs its whole L x L square, twice its
triangle: with documents of a few hundred tokens, one `is_causal` call per document (or per
bucket of documents) does twice the work the mask allows. This kernel cuts documents into query
chunks of `CHUNK` tokens; chunk [a, b) attends to keys [0, b) under a bottom-right causal mask,
so a document of L tokens costs about L^2/2 + L*CHUNK/2 score entries instead of L^2:

    keys ->      0 1 2 3 4 5 6 7        a document of 8 tokens in three chunks; the kernel
    chunk 0   0  x . .                  computes every entry shown (x = attended, . = masked)
              1  x x .                  and none of the blank ones:
              2  x x x                    chunk 0 = [0, 3): an `is_causal` call, keys [0, 3)
    chunk 1   3  x x x x . .              chunk 1 = [3, 6): keys [0, 6), a (3, 6) mask
              4  x x x x x .              chunk 2 = [6, 8): keys [0, 8), a (2, 8) mask
              5  x x x x x x
    chunk 2   6  x x x x x x x .
              7  x x x x x x x x

Which documents share a call (`_groups`, measured in docs/benchmarks.md):
  * documents of two chunks or more are attended alone, read in place from the token-major
    tensors (no copy); equal lengths share their calls;
  * shorter documents (one causal call each) are bucketed by length: a bucket of n documents is
    gathered, right-padded to its longest length L and attended in one call on n rows;
  * documents longer than `CHUNKED_UP_TO` are attended alone in one causal call, and whole rows
    (every document a row) in exactly `full`'s call.
Padding is exact: under a causal mask a real token never sees the padding after it, and padded
slots repeat their document's last token so every value stays finite; their gradients are exactly
zero (their output gradient is), so dropping them is exact too.

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

# Query chunk length. 16K tokens / 32 documents, one thread, CPU time of the attention core
# against the previous kernel (whole documents per call): 48 -> 1.12x, 64 -> 1.20x, 96 -> 1.10x,
# 128 -> 1.08x with bucketed documents. Shorter chunks waste less of the diagonal but run the
# kernel on smaller tiles and make more calls.
CHUNK = 64
# Longer documents are attended alone in one `is_causal` call: the kernel's own causal block
# skipping then wastes little (1.25x the triangle at 2K, 1.12x at 4K) and its larger tiles run faster.
CHUNKED_UP_TO = 2048
# Documents of two chunks or more share a bucket when the longest is at most this many times the
# shortest. 1 (alone, read in place): 1.39x at 16K / 32 documents, 1.48x at 4K / 16; 2 (gathered,
# the last chunk of each document padded to the bucket's grid): 1.20x and 0.96x.
_MAX_LENGTH_RATIO = 1
# Shorter documents (one causal call each) join the current bucket (padded to its longest member)
# when padding wastes at most this share of their own attention cost ...
_MAX_PAD_WASTE = 0.3
# ... or when the padded work is smaller than the fixed cost of one more call: on CPU one flash
# fwd+bwd call costs about 0.1-0.2 ms, as much as a causal document of about 64 tokens.
_CALL_COST_TOKENS = 64

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True, eq=False)
class Bucket:
    """n documents of (padded) length L, longest first, attended together chunk by chunk.

    Either the n documents lie back to back from token `start` (a view of the token-major
    tensors: one document alone, or equal documents in a row, such as whole rows), or they are
    gathered into a padded copy.

    Attributes:
        chunks: the calls (a, b, m): queries [a, b) of the first m documents against their keys
            [0, b); together they cover every real token.
        start: first token of the back-to-back documents, or None when gathered.
        gather: (n*L,) token of every padded slot (padding repeats its document's last token).
        slots, tokens: (R,) the slots holding real tokens and those tokens.
    """

    n: int
    length: int
    chunks: tuple[tuple[int, int, int], ...]
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


def _chunks(lengths: list[int], chunk: int, chunked: bool) -> tuple[tuple[int, int, int], ...]:
    """The calls of a bucket whose documents have `lengths` (longest first): (a, b, m) = queries
    [a, b) of its first m documents (those longer than a) against their keys [0, b).

    Chunks are `chunk` tokens long; a last one shorter than half a chunk joins the one before.
    One causal call over the whole bucket when not `chunked` or shorter than two chunks.
    """
    longest = lengths[0]
    if not chunked or longest < 2 * chunk:
        return ((0, longest, len(lengths)),)
    edges = list(range(0, longest, chunk))
    if longest - edges[-1] < chunk // 2:
        edges.pop()
    edges.append(longest)
    return tuple((a, b, sum(n > a for n in lengths)) for a, b in zip(edges[:-1], edges[1:]))


def _groups(spans: tuple[Span, ...], chunk: int, chunked_up_to: int, ratio: float) -> list[list[int]]:
    """Documents (indices into `spans`), longest first, grouped into buckets.

    Documents longer than `chunked_up_to` are attended alone. Documents of two chunks or more
    share a bucket while the longest is at most `ratio` times the shortest. Shorter
    ones join the current bucket when padding to its length wastes little (`_MAX_PAD_WASTE`) or
    costs less than another call (`_CALL_COST_TOKENS`); equal lengths always share a bucket.
    """
    order = sorted(range(len(spans)), key=lambda i: (-spans[i].length, spans[i].start))
    groups: list[list[int]] = []
    for i in order:
        n = spans[i].length
        longest = spans[groups[-1][0]].length if groups else None
        if longest is None or longest > chunked_up_to:
            joins = False
        elif n >= 2 * chunk:
            joins = longest <= ratio * n
        else:
            waste = longest * longest - n * n
            joins = longest < 2 * chunk and (waste <= _MAX_PAD_WASTE * n * n or waste <= _CALL_COST_TOKENS**2)
        if joins:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _bucket(spans: list[Span], chunks: tuple[tuple[int, int, int], ...], device: torch.device) -> Bucket:
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
def _plan(
    spans: tuple[Span, ...], seq_len: int, device: torch.device, chunk: int, chunked_up_to: int, ratio: float
) -> ChunkPlan:
    """The buckets of one layout (kept: every layer and the backward reuse them); the policy
    (`CHUNK`, `CHUNKED_UP_TO`, `_MAX_LENGTH_RATIO`) is part of the key.

    Whole rows (every document a row) are one bucket in one causal call: exactly `full`'s call.
    """
    if all(s.length == seq_len for s in spans):
        return ChunkPlan((_bucket(list(spans), ((0, seq_len, len(spans)),), device),))
    buckets = []
    for group in _groups(spans, chunk, chunked_up_to, ratio):
        members = [spans[i] for i in group]
        lengths = [s.length for s in members]
        buckets.append(_bucket(members, _chunks(lengths, chunk, lengths[0] <= chunked_up_to), device))
    return ChunkPlan(tuple(buckets))


def chunk_plan(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> ChunkPlan:
    """Check `cu_seqlens` (`longcpt.batch.document_spans`) and plan the kernel's calls.

    Raises:
        LongcptError: `cu_seqlens` breaks the packed-batch contract.
    """
    spans = tuple(document_spans(cu_seqlens, batch, seq_len))
    return _plan(spans, seq_len, cu_seqlens.device, CHUNK, CHUNKED_UP_TO, _MAX_LENGTH_RATIO)


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
        for a, b, m in bucket.chunks:
            o, lse_c = _FLASH(qb[:m, :, a:b], kb[:m, :, :b], vb[:m, :, :b], 0.0, a == 0, attn_mask=_mask(a, b, q))
            ob[:m, :, a:b] = o  # (m, Hq, b-a, D)
            lb[:m, :, a:b] = lse_c  # (m, Hq, b-a)
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
        for a, b, m in bucket.chunks:
            dq_c, dk_c, dv_c = _FLASH_BACKWARD(
                gb[:m, :, a:b], qb[:m, :, a:b], kb[:m, :, :b], vb[:m, :, :b], ob[:m, :, a:b], lb[:m, :, a:b],
                0.0, a == 0, attn_mask=_mask(a, b, q),
            )
            dqb[:m, :, a:b] = dq_c  # (m, Hq, b-a, D)
            dkb[:m, :, :b] += dk_c  # (m, H, b, D)
            dvb[:m, :, :b] += dv_c
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
