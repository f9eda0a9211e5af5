"""The model a recipe trains, as counts: parameters by role and the architecture's sizes.

The counts come from the model code itself: `CausalLM` is built on PyTorch's `meta` device (no
memory, no weights read), so tied embeddings, biases and a kind's own parameters are counted exactly as
`longcpt train` would create them, from the arguments `longcpt train` builds
(`longcpt.model.recipe.model_args`). With `model.lora`, peft's adapters are injected into that
model as training injects them (`longcpt.lora.adapters.apply_lora`), so what is trained and what
stays frozen are counted from the model too.
"""

from __future__ import annotations

from dataclasses import dataclass

# The block's linear layers and norms, as `longcpt.model.llama.Block` names them.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class LoraShape:
    """What a LoRA run trains in one block (the first; every block is alike) and the head.

    Attributes:
        rank: the adapters' rank r.
        adapted: the block's linear layers with adapters (`LINEARS` names).
        trained: the block's linear layers and norms trained in full.
        head: the LM head is trained (in full, or through a trained tied embedding).
    """

    rank: int
    adapted: frozenset[str]
    trained: frozenset[str]
    head: bool

    def keeps_input(self, name: str) -> bool:
        """Does the backward need this linear layer's (or norm's) own input or output kept: it has an
        adapter or a trained weight? A frozen one needs none (autograd keeps only what a gradient
        that is asked for reads)."""
        return name in self.adapted or name in self.trained


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
        parameter_sizes: elements of each trained parameter tensor.
        frozen: parameters that are not trained (LoRA's base weights; 0 otherwise).
        frozen_matmul: of `matmul_parameters`, the frozen ones (their weight gradients are not computed).
        frozen_sizes: elements of each frozen parameter tensor.
        largest_trained_module: the most trained parameters held directly by one module.
        lora: what a LoRA run trains in a block (`LoraShape`), or None.

    `parameters` and `parameter_sizes` count what is trained (gradients and optimizer state are
    held for them); the weights a device holds are `parameters + frozen`.
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
    frozen: int = 0
    frozen_matmul: int = 0
    frozen_sizes: tuple[int, ...] = ()
    largest_trained_module: int = 0
    lora: LoraShape | None = None

    @property
    def weights(self) -> int:
        """Every parameter a device holds (trained and frozen)."""
        return self.parameters + self.frozen

    @classmethod
    def from_args(cls, args, lora=None) -> ModelShape:
        """Count the parameters of `CausalLM(args)` built on the meta device, with `lora` (the recipe's
        `model.lora` section) injected when given."""
        import torch
        from torch import nn

        from longcpt.model.llama import CausalLM

        with torch.device("meta"):
            model = CausalLM(args)
            if lora is not None:
                from longcpt.lora.adapters import apply_lora

                apply_lora(model, lora)
        unique = {id(p): p for p in model.parameters()}  # tied: counted once
        trained = {k: p.numel() for k, p in unique.items() if p.requires_grad}
        frozen = {k: p.numel() for k, p in unique.items() if not p.requires_grad}
        matmul = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        largest_trained = max(sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
                              for m in model.modules())
        return cls(
            parameters=sum(trained.values()),
            matmul_parameters=sum(p.numel() for p in matmul.values()),
            largest_module=largest,
            layers=args.num_hidden_layers,
            hidden=args.hidden_size,
            intermediate=args.intermediate_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            vocab=args.vocab_size,
            parameter_sizes=tuple(trained.values()),
            frozen=sum(frozen.values()),
            frozen_matmul=sum(p.numel() for p in matmul.values() if not p.requires_grad),
            frozen_sizes=tuple(frozen.values()),
            largest_trained_module=largest_trained,
            lora=_lora_shape(model, lora) if lora is not None else None,
        )


def _lora_shape(model, lora) -> LoraShape:
    """What block 0 and the head of an adapted model train."""
    block = model.model.layers[0]
    modules = dict(block.named_modules())
    adapted = {name for name in LINEARS for m in modules if m.endswith(name) and hasattr(modules[m], "lora_A")}
    trained = {name for name in (*LINEARS, *NORMS) for m, module in modules.items()
               if m.endswith(name) and any(p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)}
    return LoraShape(lora.r, frozenset(adapted), frozenset(trained), model.lm_head.weight.requires_grad)
