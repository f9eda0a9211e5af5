"""Infini-attention at the model level: segment-major training and gate statistics.

The attention core (`attention/infini.py`) gives the same result whichever way the work is
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

import dataclasses
import math

import torch
from torch.utils.checkpoint import checkpoint

from longcpt.errors import LongcptError
from longcpt.model.attention.infini import InfiniAttention, InfiniMemory, document_positions, document_spans
from longcpt.model.loss import IGNORE_INDEX

Memories = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: M (n, Hk, D, D), z (n, Hk, D)


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
        cu_seqlens: (N+1,) document starts over B*T (SPEC section 6), or None for one per row.
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
    spans = document_spans(cu_seqlens, b, t)
    if position_ids is not None:
        expected = document_positions(cu_seqlens.to(device) if cu_seqlens is not None else None, b, t)
        if not torch.equal(position_ids.expand(b, t).to(device), expected):
            raise LongcptError(
                "infini training: position_ids must restart at 0 in every document of cu_seqlens "
                "(SPEC section 6); pass position_ids=None to derive them"
            )
    flat_ids, flat_labels = input_ids.reshape(-1), labels.reshape(-1)  # (B*T,)
    memories: dict[int, Memories] = {}  # document -> its memory after its last segment so far
    total = torch.zeros((), dtype=torch.float32, device=device)
    steps = max(math.ceil(length / n) for _, length in spans)
    for s in range(steps):
        if s and s % bptt == 0:  # a new truncated-backprop window for every document
            memories = {d: [(m.detach(), z.detach()) for m, z in mem] for d, mem in memories.items()}
        alive = [(d, start + s * n, min(n, length - s * n)) for d, (start, length) in enumerate(spans) if length > s * n]
        for group in _budget_groups(alive, b * n):
            docs = [d for d, _, _ in group]
            index = torch.cat([torch.arange(st, st + ln, device=device) for _, st, ln in group])  # (L,)
            positions = torch.cat([torch.arange(s * n, s * n + ln, device=device) for _, _, ln in group])
            cu = torch.tensor([0, *_cumsum([ln for _, _, ln in group])], dtype=torch.int32, device=device)
            memory_in = None
            if s:
                memory_in = [
                    (torch.stack([memories[d][layer][0] for d in docs]), torch.stack([memories[d][layer][1] for d in docs]))
                    for layer in range(len(model.model.layers))
                ]
            inputs = (model, flat_ids[index][None], positions[None], cu, flat_labels[index][None], memory_in, chunk_size)
            if torch.is_grad_enabled():
                loss, memory_out = checkpoint(_segment_loss, *inputs, use_reentrant=False)
            else:
                loss, memory_out = _segment_loss(*inputs)
            total = total + loss
            for i, d in enumerate(docs):
                if spans[d][1] > (s + 1) * n:  # the document goes on: keep its memory
                    memories[d] = [(m[i], z[i]) for m, z in memory_out]
                else:
                    memories.pop(d, None)
    if reduction == "sum":
        return total
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _cumsum(values: list[int]) -> list[int]:
    out, acc = [], 0
    for v in values:
        acc += v
        out.append(acc)
    return out


def _budget_groups(pieces: list[tuple[int, int, int]], budget: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive pieces (document, flat start, length) in groups of at most `budget` tokens."""
    groups: list[list[tuple[int, int, int]]] = []
    size = budget
    for piece in pieces:
        if size + piece[2] > budget:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += piece[2]
    return groups


def _segment_loss(model, input_ids, position_ids, cu_seqlens, labels, memory_in: Memories | None, chunk_size):
    """Summed loss of one group of segments (1, L) and the memories it leaves (per layer)."""
    streams = cu_seqlens.numel() - 1
    ctx = model.context(input_ids, position_ids, cu_seqlens)
    x = model.model.embed_tokens(input_ids)  # (1, L, C)
    memory_out = []
    for layer, block in enumerate(model.model.layers):
        state = InfiniMemory.empty(streams)
        if memory_in is not None:
            state = dataclasses.replace(state, memory=memory_in[layer][0], norm=memory_in[layer][1])
        if model.activation_checkpointing and torch.is_grad_enabled():
            x, state = checkpoint(_run_block, block, x, ctx, layer, state, use_reentrant=False)
        else:
            x, state = _run_block(block, x, ctx, layer, state)
        memory_out.append((state.memory, state.norm))
    hidden = model.model.norm(x)
    loss = model.lm_head(hidden, labels, chunk_size=chunk_size, reduction="sum")  # inside LMHead.forward: ZeRO-3 gathers
    return loss, memory_out


def _run_block(block, x: torch.Tensor, ctx, layer: int, state: InfiniMemory):
    """One block as a pure function: (x, memory in) -> (x, memory out)."""
    ctx = dataclasses.replace(ctx, state={layer: state})  # cache (the segment plan) stays shared
    x = block(x, ctx)
    return x, ctx.state[layer]


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
    memory weight exceeds 0.5 (gates that never move are the classic failure; DESIGN.md section 4).

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
