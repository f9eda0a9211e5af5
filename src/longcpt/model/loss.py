"""Memory-lean causal-LM loss: logits are never materialised for the whole sequence at once.

For T tokens and vocabulary V the plain loss stores a (T, V) float32 logits tensor plus its
gradient (16K tokens x 128K vocab = 8 GiB each). Here the hidden states are cut into chunks; each
chunk's logits and cross-entropy are computed under activation checkpointing, so only one chunk's
logits exist at a time, in the forward and in the backward (litgpt's `chunked_cross_entropy`,
ProLong's `LOGIT_BLOCK_SIZE` do the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (n, V) in float32 for a stable log-softmax
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels`, chunk by chunk.

    Args:
        hidden: (..., D) final hidden states (after the last norm).
        weight: (V, D) output projection.
        labels: (...) targets aligned with `hidden` (already shifted); -100 is ignored.
        chunk_size: tokens per chunk.
        reduction: "mean" over non-ignored tokens, or "sum".

    Returns:
        Scalar loss (0 when every label is ignored, keeping the graph connected).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    labels = labels.reshape(-1)  # (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, y)
    if reduction == "sum":
        return total
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
