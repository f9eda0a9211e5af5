"""Ulysses sequence parallelism: N ranks share one window, all-to-all around the attention core.

DeepSpeed-Ulysses (arXiv 2309.14509, section 3): outside attention every op of a decoder
(embedding, norms, projections, MLP, loss) works token by token, so rank r of a group of N holds
only its T/N consecutive tokens of the window. Attention needs every token, but each head is
independent; so around the attention core one all-to-all trades "T/N tokens, all heads" for
"all T tokens, H/N heads", the unchanged core runs, and a second all-to-all trades back:

    rank r:  q, k, v (B, H, T/N, D)   --all-to-all-->   (B, H/N, T, D)    heads r*H/N .. (r+1)*H/N-1
             core(q, k, v, ctx)       (whole window: full / intra_doc / anchor masks as usual)
             y (B, H/N, T, D)         --all-to-all-->   (B, H, T/N, D)    back to rank r's tokens

Because every rank's core sees the whole window, document masking needs nothing new: the
attention context keeps the window's global `position_ids` and `cu_seqlens` (`longcpt.batch`),
exactly as one process would have them. This is how the official AnchorAttention code runs
(haonan3/AnchorContext, through yunchang's Ulysses attention, with unsharded document starts).

Grouped-query attention: the query heads of rank r (a contiguous block) use a contiguous block of
KV heads. When the Hk KV heads divide among the N ranks, each rank gets Hk/N of them; when there
are fewer KV heads than ranks (N a multiple of Hk), every KV head is first repeated N/Hk times,
so rank r gets one copy of the KV head its query heads share (the gradients of the copies add up
in the backward). `longcpt.strategies` refuses head counts where neither divides the other.

Communication per layer and rank: 4 all-to-alls in the forward (q, k, v, output), each of this
rank's B x T/N x H x D block (K/V with their own head count), and 4 in the backward. The volume
per rank does not grow with N, which is Ulysses' point.

Shapes: B batch, T window tokens, t = T/N tokens per rank, N group size, H heads (Hq query,
Hk KV), D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longcpt.errors import LongcptError


class _AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` over dim 0 in equal blocks; the backward sends the gradients back
    the same way (block j of rank i returns from rank j, which is again one all-to-all)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)  # contiguous like x: all_to_all_single fills it in memory order
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward sums the incoming gradients over the group too.

    Every rank of the group goes on from the same summed value, so the gradient with respect to
    each rank's input is the sum of all ranks' upstream gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Differentiable sum of `x` over `group` (see `_AllReduceSum`)."""
    return _AllReduceSum.apply(x, group)


@dataclass(frozen=True)
class SequenceParallel:
    """The group of ranks sharing one window, and this rank's place in it.

    Attributes:
        group: the torch.distributed process group of the N ranks (from
            `longcpt.strategies.sequence_parallel_group` in training).
        size: N.
        rank: this rank's index in the group; it holds window tokens [rank*T/N, (rank+1)*T/N).
    """

    group: Any
    size: int
    rank: int

    @classmethod
    def of(cls, group: Any) -> SequenceParallel:
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's T/N consecutive tokens of a whole-window tensor (tokens along `dim`).

        Raises:
            LongcptError: N does not divide the window length T (the last T mod N tokens would
                belong to no rank and be dropped without a word).
        """
        if x.shape[dim] % self.size:
            raise LongcptError(
                f"sequence parallelism over {self.size} ranks needs a window length divisible by {self.size}; "
                f"this window has {x.shape[dim]} tokens: make data.seq_len (or the window passed to the model) "
                f"a multiple of {self.size}")
        t = x.shape[dim] // self.size
        return x.narrow(dim, self.rank * t, t)

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, t, D) this rank's tokens, all heads -> (B, H/N, T, D) all tokens, its heads."""
        b, h, t, d = x.shape
        n = self.size
        x = x.view(b, n, h // n, t, d).transpose(0, 1)  # (N, B, H/N, t, D): block j goes to rank j
        x = _AllToAll.apply(x, self.group)  # (N, B, H/N, t, D): block j came from rank j (its tokens)
        return x.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t, d)  # (B, H/N, T, D)

    def tokens_to_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H/N, T, D) all tokens, this rank's heads -> (B, H, t, D) its tokens, all heads."""
        b, hn, big_t, d = y.shape
        n, t = self.size, big_t // self.size
        y = y.view(b, hn, n, t, d).permute(2, 0, 1, 3, 4)  # (N, B, H/N, t, D): block j goes to rank j
        y = _AllToAll.apply(y, self.group)  # (N, B, H/N, t, D): block j holds heads of rank j
        return y.transpose(0, 1).reshape(b, n * hn, t, d)  # (B, H, t, D)

    def attend(self, core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        """`core(q, k, v, ctx)` over the whole window for this rank's heads.

        Args:
            core: an attention kind's module (`longcpt.model.attention`).
            q: (B, Hq, t, D); k, v: (B, Hk, t, D), this rank's tokens.
            ctx: the `AttentionContext` of the whole window (global positions and `cu_seqlens`).

        Returns:
            (B, Hq, t, D) for this rank's tokens.
        """
        k, v = repeat_kv_heads(k, self.size), repeat_kv_heads(v, self.size)
        q, k, v = self.heads_to_tokens(q), self.heads_to_tokens(k), self.heads_to_tokens(v)
        return self.tokens_to_heads(core(q, k, v, ctx))


def repeat_kv_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hk, t, D) -> (B, max(Hk, N), t, D): each KV head repeated N/Hk times when Hk < N.

    Copies of a head sit next to each other, so after the split rank r holds the KV head of its
    query heads r*Hq/N ..: query head h uses KV head h // (Hq/Hk), as in grouped-query attention.
    """
    hk = x.shape[1]
    return x if hk >= n else x.repeat_interleave(n // hk, dim=1)
