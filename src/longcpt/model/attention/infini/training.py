"""Infini-attention at the model level: segment-major training and gate statistics.

The attention core (`core.py`) gives the same result whichever way the work is
ordered; what differs is how much must be kept for the backward:

    layer-major   for layer: for segment: ...    `model(input_ids)`; the paper's description.
                                                 Activations of every layer for the whole window.
    segment-major for segment: for layer: ...    `model.loss(...)` for `infini` (this module).
                                                 Activations of one segment at a time.

One training step of `segment_major_loss` (a single loss, so a single backward: it works under
Lightning's automatic optimisation and DeepSpeed like any other model):

  * The window is cut into documents (`cu_seqlens`, or one per row) and every document into
    segments of N = `segment_len` tokens, counted from the document start. Step s takes segment s
    of every document that long, in groups of at most B*N tokens.
  * Each group goes through the whole model (embedding, every block, final norm and its summed
    cross-entropy) inside one `torch.utils.checkpoint` call. Its inputs are the group's tokens and
    its documents' memories (M, z per layer); its outputs are the loss and the new memories. Only
    those survive between segments; the backward recomputes one group at a time. Peak activation
    memory is therefore one segment's, whatever the window length, and logits exist only inside
    the checkpoint (chunked, `loss.py`).
  * Truncated backpropagation through time: the memories entering segment s are detached when s
    is a multiple of `bptt_segments`. With bptt_segments >= 2 a segment's loss reaches the K/V
    projections of earlier segments through the memory, which is how W_K/W_V learn to write
    (lucidrains/infini-transformer-pytorch detaches every 2 segments for this reason; Beomi's
    per-segment detach never trains the write path). Documents start their own windows.
  * `model.activation_checkpointing` also checkpoints each block inside a segment. Blocks are run
    as pure functions of (hidden states, memory in): the core never mutates the state it is given,
    so the recomputation in the backward sees the same inputs.

Shapes: B batch, T tokens per row, N segment length, Hk KV heads, D head dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from longcpt.batch import IGNORE_INDEX, document_spans
from longcpt.batch import position_ids as rule_position_ids
from longcpt.errors import LongcptError
from longcpt.model.attention.infini.core import InfiniAttention, InfiniMemory

Memories = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: M (n, Hk, D, D), z (n, Hk, D)


class SegmentPiece(NamedTuple):
    """Segment s of document `doc`: `length` tokens from flat index `start` (over B*T)."""

    doc: int
    start: int
    length: int


def infini_cores(model) -> list[InfiniAttention]:
    """The Infini attention cores of `model`, in layer order (empty for other kinds)."""
    return [m for m in model.modules() if isinstance(m, InfiniAttention)]


def segment_major_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Next-token loss of an Infini `CausalLM`, computed segment by segment (module docstring).

    Args:
        model: a `CausalLM` whose attention kind is `infini`.
        input_ids: (B, T) tokens.
        labels: (B, T) targets aligned with `input_ids` (-100 = ignored).
        position_ids: (B, T) positions restarting at 0 in every document, or None to derive them.
        cu_seqlens: (N+1,) document starts over B*T (`longcpt.batch`), or None for one per row.
        reduction: "mean" over non-ignored labels, or "sum".
        chunk_size: tokens per cross-entropy chunk.

    Returns:
        Scalar float32 loss; call backward() on it once.

    Raises:
        LongcptError: `position_ids` that do not restart at 0 in every document, or bad cu_seqlens.
    """
    b, t = input_ids.shape
    device = input_ids.device
    core = infini_cores(model)[0]
    n, bptt = core.segment_len, core.bptt_segments
    cu = cu_seqlens.to(device) if cu_seqlens is not None else None
    spans = document_spans(cu, b, t)
    expected = rule_position_ids("document", cu, b, t)  # restarting at 0 in every document
    if position_ids is not None and not torch.equal(position_ids.expand(b, t).to(device), expected):
        raise LongcptError(
            "infini training: position_ids must restart at 0 in every document of cu_seqlens "
            "(the `document` rule of longcpt.batch); pass position_ids=None to derive them"
        )
    flat_ids, flat_labels = input_ids.reshape(-1), labels.reshape(-1)  # (B*T,)
    memories: dict[int, Memories] = {}  # document -> its memory after its last segment so far
    total = torch.zeros((), dtype=torch.float32, device=device)
    for s in range(max(math.ceil(span.length / n) for span in spans)):
        if s and s % bptt == 0:  # a new truncated-backprop window for every document
            memories = {d: [(m.detach(), z.detach()) for m, z in mem] for d, mem in memories.items()}
        alive = [
            SegmentPiece(d, span.start + s * n, min(n, span.length - s * n))
            for d, span in enumerate(spans)
            if span.length > s * n
        ]
        for group in _budget_groups(alive, b * n):
            loss, memory_out = _group_loss(model, group, s * n, flat_ids, flat_labels, memories, chunk_size)
            total = total + loss
            for i, piece in enumerate(group):
                if spans[piece.doc].length > (s + 1) * n:  # the document goes on: keep its memory
                    memories[piece.doc] = [(m[i], z[i]) for m, z in memory_out]
                else:
                    memories.pop(piece.doc, None)
    if reduction == "sum":
        return total
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _budget_groups(pieces: list[SegmentPiece], budget: int) -> list[list[SegmentPiece]]:
    """Consecutive pieces in groups of at most `budget` tokens."""
    groups: list[list[SegmentPiece]] = []
    size = budget
    for piece in pieces:
        if size + piece.length > budget:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += piece.length
    return groups


def _group_loss(model, group: list[SegmentPiece], first_position: int, flat_ids, flat_labels, memories, chunk_size):
    """Summed loss of one group of segments and the memories it leaves, inside one checkpoint."""
    device = flat_ids.device
    index = torch.cat([torch.arange(p.start, p.start + p.length, device=device) for p in group])  # (L,)
    positions = torch.cat([torch.arange(first_position, first_position + p.length, device=device) for p in group])
    lengths = torch.tensor([p.length for p in group], device=device)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    memory_in = None
    if first_position:
        docs = [p.doc for p in group]
        memory_in = [
            (torch.stack([memories[d][layer][0] for d in docs]), torch.stack([memories[d][layer][1] for d in docs]))
            for layer in range(len(model.model.layers))
        ]
    inputs = (model, flat_ids[index][None], positions[None], cu, flat_labels[index][None], memory_in, chunk_size)
    if torch.is_grad_enabled():
        return checkpoint(_segment_loss, *inputs, use_reentrant=False)
    return _segment_loss(*inputs)


def _segment_loss(model, input_ids, position_ids, cu_seqlens, labels, memory_in: Memories | None, chunk_size):
    """Summed loss of one group of segments (1, L) and the memories it leaves (per layer)."""
    streams = cu_seqlens.numel() - 1
    state: dict[int, InfiniMemory] = {}
    if memory_in is not None:
        for layer, (memory, norm) in enumerate(memory_in):
            state[layer] = InfiniMemory(memory, norm, [None] * streams, [None] * streams)
    hidden = model.hidden_states(input_ids, position_ids, cu_seqlens, state)  # (1, L, C)
    loss = model.lm_head(hidden, labels, chunk_size=chunk_size, reduction="sum")  # inside LMHead.forward: ZeRO-3 gathers
    return loss, [(state[layer].memory, state[layer].norm) for layer in range(len(model.model.layers))]



@torch.no_grad()
def gate_values(model) -> torch.Tensor | None:
    """sigmoid(gate) of every Infini layer: (layers, Hq) float32, the weight of the memory read.

    Returns:
        None when the model has no Infini layers.
    """
    cores = infini_cores(model)
    if not cores:
        return None
    return torch.stack([torch.sigmoid(c.gate.detach().float()) for c in cores]).cpu()


def gate_stats(model) -> dict[str, float]:
    """Summary of `gate_values` for logging: mean, std, min, max and the share of heads whose
    memory weight exceeds 0.5 (gates that never move are the classic failure of Infini-attention training).

    Returns:
        {} when the model has no Infini layers, or when this rank holds none of the gates
        (DeepSpeed ZeRO-3 partitions parameters).
    """
    values = gate_values(model)
    if values is None or values.numel() == 0:
        return {}
    return {
        "gate/mean": float(values.mean()),
        "gate/std": float(values.std()) if values.numel() > 1 else 0.0,
        "gate/min": float(values.min()),
        "gate/max": float(values.max()),
        "gate/memory_heads": float((values > 0.5).float().mean()),
    }


def gate_progress(metrics: dict[str, float]) -> str:
    """The gates' range for `longcpt train`'s step line: the first thing to watch in Infini training."""
    if "train/gate/mean" not in metrics:
        return ""
    return f"  gate {metrics['train/gate/mean']:.3f} [{metrics['train/gate/min']:.3f}, {metrics['train/gate/max']:.3f}]"
