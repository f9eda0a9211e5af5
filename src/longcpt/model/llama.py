"""A Llama-family decoder (Llama 1/2/3, Mistral, Qwen2) with Hugging Face parameter names.

Read top to bottom: norm, MLP, attention, block, model. Parameter names equal transformers'
`*ForCausalLM` state dicts (`model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`),
so import/export is a near-identity map (see `hf_io.py`).

Shapes: B batch, T tokens, C hidden size, Hq query heads, Hk KV heads, D head dim, V vocab.
Packed batches carry `position_ids` (B, T) and `cu_seqlens` (N+1,) as `longcpt.batch` defines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longcpt.batch import position_ids as rule_position_ids
from longcpt.model.attention import AttentionContext, build_attention, kind_spec, resolve_options
from longcpt.model.attention.ulysses import SequenceParallel
from longcpt.model.config import ModelArgs
from longcpt.model.loss import chunked_cross_entropy
from longcpt.model.rope import RotaryEmbedding


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back, then scale: transformers' order, bit for bit."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # A fused kernel (x, weight, eps) -> y with the same numerics (`longcpt.model.fused`), or None.
        self.kernel: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.kernel or rms_norm)(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        c, f, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(c, f, bias=bias)
        self.up_proj = nn.Linear(c, f, bias=bias)
        self.down_proj = nn.Linear(f, c, bias=bias)
        # A fused silu(gate) * up kernel (`longcpt.model.fused`), or None.
        self.silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.silu_mul is not None:
            return self.down_proj(self.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """Projections around an attention kind from the registry (`args.attention`)."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        c, d = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        self.q_proj = nn.Linear(c, self.n_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, c, bias=args.o_bias)
        self.core = build_attention(args, layer_idx)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, T, D)
        if ctx.sequence_parallel is None:
            y = self.core(q, k, v, ctx)  # (B, Hq, T, D)
        else:  # T is this rank's share of the window; the core runs on all of it for Hq/N heads
            y = ctx.sequence_parallel.attend(self.core, q, k, v, ctx)  # (B, Hq, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, Hq*D)
        return self.o_proj(y)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LMHead(nn.Linear):
    """Output projection; with `labels` it returns the chunked cross-entropy instead of logits.

    The loss is computed inside this module's own forward so that hooks that materialise the
    weight for a module's forward (DeepSpeed ZeRO-3 gathers partitioned parameters that way) also
    cover the loss path.
    """

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, **loss_kwargs) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)
        return chunked_cross_entropy(hidden, self.weight, labels, **loss_kwargs)


class Decoder(nn.Module):
    """Embedding, blocks and final norm: transformers' `model.*` submodule."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings, args.rope_precision
        )


def _stateful_block(block: Block, x: torch.Tensor, ctx: AttentionContext, layer: int, layer_state):
    """One block as a pure function (x, layer state in) -> (x, layer state out).

    Activation checkpointing re-runs a block in the backward; a core that replaced its entry of
    `ctx.state` would then read its own output. Giving each run its own one-entry state keeps the
    recomputation equal to the first run.
    """
    ctx = dataclasses.replace(ctx, state={} if layer_state is None else {layer: layer_state})
    x = block(x, ctx)
    return x, ctx.state.get(layer)


class CausalLM(nn.Module):
    """The decoder plus LM head. `forward` returns logits; `loss` is the memory-lean training path.

    Args:
        args: architecture, attention kind and its options (checked and completed with the kind's
            defaults; `self.args` holds the result).
        init_weights: draw the initial weights (`initializer_range`); False leaves each layer's
            own default init, for a model whose weights are loaded next.

    Attributes:
        activation_checkpointing: recompute each block in the backward (set by the trainer).
        sequence_parallel: a `SequenceParallel` group (set by the trainer) or None. With a group,
            every rank passes the same whole window (B, T) to `hidden_states`/`loss`; each
            computes its T/N tokens (`hidden_states` returns (B, T/N, C)), attention runs over the
            whole window through all-to-alls, and `loss` is the whole window's loss.
    """

    def __init__(self, args: ModelArgs, init_weights: bool = True):
        super().__init__()
        # The kind's options with its defaults filled in and checked (one owner: the registry).
        args = dataclasses.replace(args, attention_options=resolve_options(args.attention, args.attention_options))
        self.args = args
        self.model = Decoder(args)
        self.lm_head = LMHead(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False
        self.sequence_parallel: SequenceParallel | None = None
        if init_weights:  # off when every weight is about to be loaded (`longcpt.model.hf_io`)
            self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after `to_empty`)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.args.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def context(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: dict | None = None,
    ) -> AttentionContext:
        """Per-call attention inputs: positions and RoPE tables.

        Positions default to the attention kind's rule (`longcpt.batch.position_ids`): `arange(T)`
        per row, or, for a packed batch (`cu_seqlens`), the kind's document positions.
        """
        b, t = input_ids.shape
        if position_ids is None:
            cu = cu_seqlens.to(input_ids.device) if cu_seqlens is not None else None
            position_ids = rule_position_ids(kind_spec(self.args.attention).positions, cu, b, t)
            position_ids = position_ids.to(input_ids.device)
        cos, sin = self.model.rotary_emb(position_ids)
        return AttentionContext(position_ids, cu_seqlens, cos, sin, self.model.rotary_emb, state=state,
                                sequence_parallel=self.sequence_parallel)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: dict | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, C); the attention cores update `state` in place.

        Under sequence parallelism `input_ids` is the whole window and the result this rank's
        (B, T/N, C) share of it (see the class docstring).
        """
        ctx = self.context(input_ids, position_ids, cu_seqlens, state)  # positions of the whole window
        if ctx.sequence_parallel is not None:
            input_ids = ctx.sequence_parallel.shard(input_ids)  # (B, T/N)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer, block in enumerate(self.model.layers):
            if not recompute:
                x = block(x, ctx)
            elif state is None:
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x, layer_state = checkpoint(_stateful_block, block, x, ctx, layer, state.get(layer), use_reentrant=False)
                state[layer] = layer_state
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: dict | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, cu_seqlens, state))

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: dict | None = None,
        reduction: str = "mean",
        chunk_size: int = 4096,
    ) -> torch.Tensor:
        """Next-token loss with `labels` already aligned to `input_ids` (labels[t] = target of t).

        An attention kind with its own training schedule (its `training_loss` hook: Infini trains
        segment by segment) computes it instead when no `state` is passed.
        """
        kind_loss = kind_spec(self.args.attention).hooks.training_loss
        if kind_loss is not None and state is None:
            return kind_loss(self, input_ids, labels, position_ids, cu_seqlens, reduction, chunk_size)
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, state)
        sp = self.sequence_parallel
        if sp is not None:  # this rank's tokens; labels are aligned already, so no target is lost
            labels = sp.shard(labels)
        return self.lm_head(hidden, labels, chunk_size=chunk_size, reduction=reduction,
                            group=sp.group if sp is not None else None)
