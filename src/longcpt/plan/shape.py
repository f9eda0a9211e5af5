"""The model a recipe trains, as counts: parameters by role and the architecture's sizes.

The counts come from the model code itself: `CausalLM` is built on PyTorch's `meta` device (no
memory, no weights read), so tied embeddings, biases and a kind's own parameters are counted exactly as
`longcpt train` would create them, from the arguments `longcpt train` builds
(`longcpt.model.recipe.model_args`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """Sizes of the decoder that drive memory and FLOPs.

    Attributes:
        parameters: unique trainable parameters (a tied embedding counts once).
        matmul_parameters: weights of the matrix multiplications a token goes through (every
            linear layer and the LM head); the embedding lookup is not one.
        largest_module: the most parameters held directly by one module (DeepSpeed ZeRO-3 gathers
            parameters module by module, so this bounds what is gathered at once).
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab: the architecture.
        parameter_sizes: elements of each parameter tensor (ZeRO-3 keeps small ones gathered).
    """

    parameters: int
    matmul_parameters: int
    largest_module: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameter_sizes: tuple[int, ...] = ()

    @classmethod
    def from_args(cls, args) -> ModelShape:
        """Count the parameters of `CausalLM(args)` built on the meta device."""
        import torch
        from torch import nn

        from longcpt.model.llama import CausalLM

        with torch.device("meta"):
            model = CausalLM(args)
        unique = {id(p): p.numel() for p in model.parameters() if p.requires_grad}  # tied: counted once
        matmul = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        return cls(
            parameters=sum(unique.values()),
            matmul_parameters=sum(matmul.values()),
            largest_module=largest,
            layers=args.num_hidden_layers,
            hidden=args.hidden_size,
            intermediate=args.intermediate_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            vocab=args.vocab_size,
            parameter_sizes=tuple(unique.values()),
        )
