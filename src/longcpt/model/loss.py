"""Memory-lean causal-LM loss: logits are never materialised for the whole sequence at once.

For T tokens and vocabulary V the plain loss stores a (T, V) float32 logits tensor plus its
gradient (16K tokens x 128K vocab = 8 GiB each). Here the hidden states are cut into chunks and
only one chunk's logits exist at a time (litgpt's `chunked_cross_entropy`, ProLong's
`LOGIT_BLOCK_SIZE` do the same).

When gradients are needed, each chunk's gradient is computed right away in the forward, from the
logits already at hand (softmax - one-hot), and kept for the backward: the gradient of the hidden
states (T, C) and of the output projection (V, C, float32). This is what fused linear-cross-entropy
kernels do (e.g. Liger-Kernel's); it costs the same three matmuls per chunk as the plain loss,
where checkpointing each chunk would recompute the logits (a fourth matmul, about 15% of a
4K-token step of a small model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            total = total + _chunk_loss_sum(h, weight, y)
    if reduction == "sum":
        return total
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropies of `hidden @ weight.T`; gradients computed chunk by chunk in the forward.

    For one chunk with float32 logits z (n, V) and targets y: loss = sum(logsumexp(z) - z[y]),
    dloss/dz = softmax(z) - onehot(y) (rows of ignored labels are 0); then dhidden = dz @ W and
    dW = dz^T @ hidden. Under autocast the matmuls run in the autocast dtype, as autograd's
    backward of the plain loss would.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None  # (N, C)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None  # (V, C)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]  # (n, C), (n,)
            z = F.linear(h, weight).float()  # (n, V)
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)[:, None]  # (n, 1); ignored rows point at class 0, masked below
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            total += ((lse - z.gather(1, target)[:, 0]) * valid).sum()
            dz = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dz.scatter_add_(1, target, torch.full_like(dz[:, :1], -1.0))
            dz = dz.mul_(valid[:, None]).to(h.dtype)  # the dtype autograd would hand to the matmul
            if want_h:
                grad_h[start : start + len(h)] = F.linear(dz, weight.t())  # (n, C)
            if want_w:
                grad_w += F.linear(dz.t(), h.t()).float()  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None
