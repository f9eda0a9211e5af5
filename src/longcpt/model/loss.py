"""Memory-lean causal-LM loss: logits are never materialised for the whole sequence at once.

For N tokens and vocabulary V the plain loss keeps an (N, V) float32 logits tensor and its
gradient (16K tokens x 128K vocab = 8 GiB each). Here the hidden states are cut into chunks and,
while the forward visits a chunk, it also computes that chunk's gradients with respect to the
hidden states and the output projection (the softmax minus the one-hot target, times the
projection). The backward then only scales the stored gradients by the incoming gradient.

Compared with recomputing each chunk's logits in the backward (activation checkpointing), this
does the same three matmuls as the plain loss (logits, grad_hidden, grad_weight) and no more, and
keeps only one chunk's logits alive at any time. Liger-Kernel's fused linear cross-entropy and
litgpt's chunked loss follow the same idea.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longcpt.batch import IGNORE_INDEX
from longcpt.model.attention.ulysses import all_reduce_sum


def _chunk_log_probs(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor):
    """Log-probabilities (n, V) in float32 and the summed loss of one chunk (every row labelled)."""
    logp = F.linear(h, weight).float().log_softmax(dim=-1)  # fp32 for a stable log-softmax
    loss = -logp.gather(1, y.unsqueeze(1)).sum()
    return logp, loss


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden_t @ weight.T, label_t) with gradients computed chunk by chunk in the forward.
    Every row is labelled: `chunked_cross_entropy` drops the ignored ones first."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int):
        # hidden (N, D), weight (V, D), labels (N,)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            logp, loss = _chunk_log_probs(h, weight, y)
            total += loss
            if not (want_h or want_w):
                continue
            # d(sum CE)/d(logits) = softmax - onehot (in place on logp)
            d_logits = logp.exp_()  # (n, V)
            del logp  # one name for the tensor, so that casting d_logits below frees the float32 copy
            d_logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            d_logits = d_logits.to(h.dtype)
            if want_h:
                grad_hidden[start : start + chunk_size] = d_logits @ weight.to(h.dtype)
            if want_w:
                grad_weight += (d_logits.T @ h).float()
            # Freed before the next chunk's logits exist: a chunk's logits are the largest tensors of a
            # step (chunk x vocab), and a name still bound here would keep two chunks alive at once.
            del d_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = grad_weight * grad_out if grad_weight is not None else None
        return gh, gw, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    reduction: str = "mean",
    group: Any = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels`, never holding all logits.

    Args:
        hidden: (..., D) final hidden states (after the last norm).
        weight: (V, D) output projection.
        labels: (...) targets aligned with `hidden` (already shifted); -100 is ignored.
        chunk_size: tokens per chunk (peak extra memory is chunk_size x V floats).
        reduction: "mean" over non-ignored tokens, or "sum".
        group: under sequence parallelism, the process group whose ranks hold the other tokens
            of the same window; the result is then the whole window's loss on every rank.

    Returns:
        Scalar float32 loss (0 when every label is ignored, still connected to the graph).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    labels = labels.reshape(-1)  # (N,)
    keep = labels != IGNORE_INDEX
    if not bool(keep.all()):
        # Only labelled rows reach the projection: answer-only fine-tuning labels a few tokens per
        # example (a passkey row: 6 of ~130), and the three (rows x V) matmuls are then most of
        # the step. The gather's backward scatters the gradient back, zeros elsewhere.
        rows = keep.nonzero().squeeze(1)
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size)
    else:  # evaluation: the same chunks, no gradients kept (a tensor even when no row is labelled)
        total = sum(
            (_chunk_log_probs(hidden[i : i + chunk_size], weight, labels[i : i + chunk_size])[1]
             for i in range(0, hidden.shape[0], chunk_size)),
            torch.zeros((), dtype=torch.float32, device=hidden.device),
        )
    count = keep.sum()
    if group is not None:
        # Sequence parallelism: the window's loss is (sum of every rank's token losses) / (label
        # tokens of every rank). A mean of per-rank means would weigh a rank holding few labels
        # (padding, document ends) as much as a full one. The summed loss is the same on every rank
        # and its backward sums the N ranks' equal upstream gradients, so each rank's gradients
        # are N times its share; the data-parallel mean over all ranks (DDP, DeepSpeed) divides by
        # N again and leaves exactly the gradient of the window (see docs/sequence_parallel.md).
        total = all_reduce_sum(total, group)
        dist.all_reduce(count, group=group)
    if reduction == "sum":
        return total
    return total / count.clamp(min=1)
