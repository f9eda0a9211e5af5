"""The model a recipe trains, as counts: parameters by role and the architecture's sizes.

The counts come from the model code itself: `CausalLM` is built on PyTorch's `meta` device (no
memory, no weights read), so tied embeddings, biases and a kind's own parameters are counted exactly as
`longcpt train` would create them. The architecture is read the way `longcpt train` reads it:
`model.pretrained`'s config.json (a kind's own export included), or `model.config` with the
vocabulary size of `model.tokenizer` when the model is built from scratch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from longcpt.errors import LongcptError


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


def model_args(cfg):
    """The `ModelArgs` `longcpt train` would build for `cfg`, without reading any weights.

    Raises:
        LongcptError: `model.pretrained` has no readable config.json, or `model.config` misses a
            field, each naming the key and the fix.
    """
    from longcpt.model.config import ModelArgs

    m = cfg.model
    if m.pretrained is not None:
        from longcpt.model.hf_io import read_config, read_kind_config

        folder = Path(m.pretrained)
        if not (folder / "config.json").is_file():
            raise LongcptError(
                f"model.pretrained={m.pretrained!r}: no config.json there; `longcpt plan` reads the model's "
                "shape from it (the weights are not needed): point model.pretrained at the model folder, "
                "or at any folder holding its config.json"
            )
        try:
            hf, _, _ = read_kind_config(read_config(folder), str(folder / "config.json"))
        except json.JSONDecodeError as e:
            raise LongcptError(f"{folder / 'config.json'} line {e.lineno}: invalid JSON ({e.msg})") from None
        source = str(folder / "config.json")
    else:
        hf = {"vocab_size": _tokenizer_size(m.tokenizer), **m.config}
        source = "model.config"
    if m.rope_theta is not None:
        hf["rope_theta"] = m.rope_theta
    try:
        args = ModelArgs.from_hf_config(hf, source=source)
    except KeyError as e:
        raise LongcptError(f"{source}: missing field {e.args[0]!r} (an HF config.json field)") from None
    if args.vocab_size is None:
        raise LongcptError(
            f"model.config has no vocab_size and model.tokenizer={m.tokenizer!r} has no tokenizer.json to take "
            "it from: set model.config.vocab_size=N (or point model.tokenizer at the tokenizer folder)")
    args.attention, args.attention_options = cfg.attention.kind, dict(cfg.attention.options)
    args.rope_precision = cfg.rope.precision
    return args


def _tokenizer_size(folder: str | None) -> int | None:
    """Tokens of a tokenizer folder (added tokens included), as a model built from scratch gets."""
    file = Path(folder or "") / "tokenizer.json"
    if folder is None or not file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
