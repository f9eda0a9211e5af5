"""The S²-Attn core: causal attention inside groups of tokens, half of the heads shifted by half a group.

LongLoRA (Chen et al. 2023, arXiv 2309.12307, section 3.2) trains long windows with attention
cut into groups of `group_size` tokens, so a step costs about T x G instead of T^2 / 2; half of
the heads see groups shifted by G/2, so that information flows between neighbouring groups. At
evaluation the model runs full attention (the `inference_kind` hook: `full`), which is what
the paper shows it generalises to.

Here groups are counted from the start of every document of a packed window, and a group never
crosses a document boundary: a document is attended as if it were alone in its row. One
document of 12 tokens, G = 4 (x = may attend, `.` = masked; `|` group boundaries):

    plain heads  (the first Hq // 2)         shifted heads (the others: offset G/2)
    keys ->  0 1 2 3 4 5 6 7 8 9 a b         keys ->  0 1 2 3 4 5 6 7 8 9 a b
    0        x      |       |                0        x  |       |       |
    1        x x    |       |                1        x x|       |       |
    2        x x x  |       |                2           |x      |       |
    3        x x x x|       |                3           |x x    |       |
    4               |x      |                4           |x x x  |       |
    5               |x x    |                5           |x x x x|       |
    ...                                      ...
    b               |       |x x x x         a           |       |       |x
                                             b           |       |       |x x

The shifted heads' groups are [0, G/2), [G/2, 3G/2), ..., and the last one is cut at the
document's end. This is the official code's flash-attention path (`forward_flashattn`, where
the shifted half's `cu_seqlens` start at G/2), not its eager path, which rolls the tokens and
lets the document's first G/2 tokens attend to its last ones (a look into the future).

Both halves are plain document attention over finer "documents" (groups cut at document
boundaries), so they run through the document kinds' kernels (`longcpt.model.attention.document`):
flash-attn / torch varlen / FlexAttention on a GPU, the chunked CPU flash kernel on a CPU.

Shapes: B batch, T tokens per row, Hq query heads, Hk KV heads, D head dim, G group size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from longcpt.batch import Span, document_spans
from longcpt.errors import LongcptError
from longcpt.model.attention import POSITIVE_INT, Constraint, Option, one_of
from longcpt.model.attention.document.kernels import (
    BACKENDS,
    DocumentLayout,
    document_attention,
    document_layout,
    pick_backend,
)
from longcpt.model.attention.document.sdpa import cpu_document_attention

BOOL = Constraint(lambda x: isinstance(x, bool), "true or false")
OPTIONS = {
    "group_size": Option(2048, POSITIVE_INT, "tokens per attention group (LongLoRA: a quarter of the window)"),
    "shift": Option(True, BOOL, "shift half of the heads by half a group (false: every head on the same groups)"),
    "backend": Option("auto", one_of(*BACKENDS), "document kernel the groups run through; auto picks the fastest"),
}
_CACHE_KEY = "s2_groups"


def option_problems(options: dict) -> list[str]:
    """Rules across options: a shifted half needs a half group of at least one token."""
    if options["shift"] and options["group_size"] < 2:
        return [f"group_size={options['group_size']} with shift=true: half a group would be empty; "
                "use group_size >= 2 (LongLoRA: a quarter of the window)"]
    return []


def group_bounds(spans: Sequence[Span], group_size: int, offset: int, total: int) -> list[int]:
    """Starts of the groups of every document, then `total`: the `cu_seqlens` of the groups.

    Args:
        spans: the documents (flat start, length), in order (`longcpt.batch.document_spans`).
        group_size: G.
        offset: where the first whole group starts in each document (0, or G // 2 for the shifted
            heads, whose first group is [0, G/2)).
        total: B*T.

    Returns:
        Strictly increasing flat starts, 0 first and `total` last. Example, one document of 12
        tokens, G = 4: offset 0 -> [0, 4, 8, 12]; offset 2 -> [0, 2, 6, 10, 12].
    """
    bounds = []
    for span in spans:
        bounds.append(span.start)
        first = offset or group_size
        bounds.extend(range(span.start + first, span.start + span.length, group_size))
    return [*bounds, total]


def shifted_from(heads: int, sequence_parallel) -> int:
    """Index, among the `heads` query heads this core sees, of the first shifted head.

    The shifted heads are the model's last Hq - Hq // 2 (as in LongLoRA). Under sequence
    parallelism the core sees heads [r*Hq/N, (r+1)*Hq/N) of rank r (`ulysses.py`).
    """
    if sequence_parallel is None:
        return heads // 2
    total, first = heads * sequence_parallel.size, heads * sequence_parallel.rank
    return min(max(total // 2 - first, 0), heads)


def kv_for(k: torch.Tensor, v: torch.Tensor, a: int, b: int, q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV heads query heads [a, b) use (of `q_heads`): query head h uses KV head h // (Hq/Hk).

    Returns (B, Hk', T, D) with Hq' = b - a a multiple of Hk': a slice when [a, b) covers whole
    KV groups, else the KV heads repeated to one per query head and sliced.
    """
    rep = q_heads // k.shape[1]
    if a % rep == 0 and b % rep == 0:
        return k[:, a // rep : b // rep], v[:, a // rep : b // rep]
    return k.repeat_interleave(rep, 1)[:, a:b], v.repeat_interleave(rep, 1)[:, a:b]  # (B, b-a, T, D)


class S2Attention(nn.Module):
    """Core of `s2`: rotate at `ctx.position_ids`, then causal attention within groups (module docstring).

    Options (`attention_options`): `group_size`, `shift`, `backend` (as the document kinds').
    Training only: a call with inference state (a KV cache) is refused; generation and export run
    the model as `full`.
    """

    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        options = args.attention_options
        self.group_size = int(options.get("group_size", OPTIONS["group_size"].default))
        self.shift = bool(options.get("shift", OPTIONS["shift"].default))
        self.backend = options.get("backend", "auto")

    def forward(self, q, k, v, ctx):
        if ctx.state is not None:
            raise LongcptError("attention kind 's2' is for training only; a model trained with it generates and "
                               "evaluates as 'full' (load it for inference, or pass --attention full)")
        q, k = ctx.rotate(q, k)
        b, hq, t, _ = q.shape
        plain, shifted = self._groups(ctx, b, t, q.device)
        split = shifted_from(hq, ctx.sequence_parallel) if self.shift else hq
        halves = [(0, split, plain), (split, hq, shifted)]
        out = [self._attend(q[:, a:e], *kv_for(k, v, a, e, hq), layout) for a, e, layout in halves if e > a]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)  # (B, Hq, T, D)

    def _groups(self, ctx, batch: int, seq_len: int, device) -> tuple[DocumentLayout, DocumentLayout]:
        """(plain, shifted) group layouts of this forward, computed once and shared by the layers."""
        key = f"{_CACHE_KEY}/{self.group_size}/{self.shift}"
        if key not in ctx.cache:
            spans = document_spans(ctx.cu_seqlens, batch, seq_len)
            g, total = self.group_size, batch * seq_len

            def layout(offset: int) -> DocumentLayout:
                cu = torch.tensor(group_bounds(spans, g, offset, total), dtype=torch.int32)
                return document_layout(cu, batch, seq_len, device)

            plain = layout(0)
            ctx.cache[key] = (plain, layout(g // 2) if self.shift else plain)
        return ctx.cache[key]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout) -> torch.Tensor:
        """Causal attention within every group of `layout` (document attention over the groups)."""
        if q.device.type == "cpu" and pick_backend(self.backend, q) == "sdpa":
            return cpu_document_attention(q, k, v, layout.cu_seqlens)
        return document_attention(q, k, v, layout, self.backend)
