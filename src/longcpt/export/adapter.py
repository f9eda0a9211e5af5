"""`longcpt export RUN --output DIR --adapter-only [--base BASE]`: a LoRA run as a peft adapter folder.

The folder is what `peft.PeftModel.from_pretrained(base, DIR)` loads on top of the base model,
with no longcpt in the loading path:

    adapter_config.json          peft's LoraConfig: r, lora_alpha, lora_dropout, target_modules,
                                 modules_to_save (the `trainable` modules), base_model_name_or_path
    adapter_model.safetensors    `base_model.model.<module>.lora_A.weight` / `lora_B.weight` for the
                                 adapters, `base_model.model.<module>.weight` for the modules trained
                                 in full (peft's own names for them)
    tokenizer files

The base is the folder the run adapted (`model.pretrained`). A run that changed its RoPE settings
(`rope.theta`, `rope.scaling`) needs a base with those settings: `--base BASE` writes the frozen
base as the run used it (plain Hugging Face folder, the same weights) and the adapter names it.
What peft cannot carry is refused with the fix (export merged instead): parameters an attention
kind adds (Infini's gates), and trained embeddings tied to the LM head (peft trains a copy of the
embedding, and the head would keep the old one).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from longcpt.errors import LongcptError
from longcpt.fsio import atomic_dir

PREFIX = "base_model.model."  # where peft's PeftModelForCausalLM keeps the base model's parameters


def peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our trained tensors by peft's file names: `...q_proj.lora_A.default.weight` ->
    `base_model.model....q_proj.lora_A.weight`, `model.norm.weight` -> `base_model.model.model.norm.weight`."""
    from longcpt.lora.adapters import ADAPTER

    return {PREFIX + name.replace(f".{ADAPTER}.", "."): tensor for name, tensor in state.items()}


def write_adapter(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    base_output: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Write the peft adapter folder of a LoRA checkpoint (atomically), and with `base_output` its base.

    Args:
        checkpoint: a LoRA run's checkpoint (`longcpt.export.convert.resolve_checkpoint`).
        output: the adapter folder.
        dtype: "bf16" | "fp16" | "fp32"; default as trained (`convert.default_dtype`).
        tokenizer: tokenizer folder to copy; default the run's.
        base_output: write the frozen base model here, as the run used it, and point the adapter at it.

    Returns:
        (the adapter folder, the base folder it names).

    Raises:
        LongcptError: not a LoRA checkpoint, something peft cannot carry, a base folder that is not
            the one trained on, or a run whose RoPE settings differ from its base folder's without
            `base_output`.
    """
    from longcpt.export.convert import default_dtype, find_tokenizer, read_checkpoint, resolve_checkpoint
    from longcpt.export.hf import copy_tokenizer, save_pretrained
    from longcpt.lora.adapters import check_base, peft_config
    from longcpt.lora.config import LoraConfig
    from longcpt.model.attention import inference_kind, kind_spec
    from longcpt.model.config import ModelArgs
    from longcpt.model.hf_io import _as_dtype, folder_args, load_pretrained

    path = resolve_checkpoint(checkpoint)
    state, meta = read_checkpoint(path)
    record = meta.get("lora")
    if record is None:
        raise LongcptError(f"{path}: --adapter-only needs a LoRA run (model.lora); this one trained every "
                           "parameter: export it without --adapter-only")
    lora, args = LoraConfig(**record["settings"]), ModelArgs(**meta["model_args"])
    own = kind_spec(args.attention).hooks.own_parameters
    if own:
        raise LongcptError(f"{path}: attention kind {args.attention!r} trains parameters of its own ({', '.join(own)}) "
                           "that a peft adapter folder does not carry: export without --adapter-only (merged)")
    if args.tie_word_embeddings and any(n.endswith("embed_tokens.weight") for n in state):
        raise LongcptError(f"{path}: the embeddings were trained and are tied to the LM head, which peft would leave "
                           "untrained (modules_to_save copies the embedding): export without --adapter-only (merged)")
    base = Path(record["base"])
    check_base(base, record["fingerprint"], str(path))
    run_args = args.run_as(inference_kind(args.attention), {}, args.rope_precision)
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(path, meta)
    target = _as_dtype(dtype or default_dtype(meta))
    if base_output is not None:
        model = load_pretrained(base, run_args, dtype="fp32")
        base = save_pretrained(model, base_output, dtype=target, tokenizer=tok)
    elif _rope(folder_args(base)) != _rope(run_args):
        raise LongcptError(f"{path}: the run changed RoPE to {_rope(run_args)} from its base folder's {_rope(folder_args(base))}; "
                           "the adapters need a base with the run's settings: add --base DIR to write one")
    config = peft_config(lora, modules_to_save=list(lora.trainable) or None, base_model_name_or_path=str(base),
                         task_type="CAUSAL_LM")
    with atomic_dir(output) as tmp:
        config.save_pretrained(tmp)
        tensors = {k: v.to(target).contiguous() for k, v in peft_names(state).items()}
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        if tok is not None:
            copy_tokenizer(tok, tmp, args.vocab_size)
    return Path(output), Path(base)


def _rope(args) -> tuple:
    """The RoPE settings of `ModelArgs` that a config.json carries."""
    return args.rope_theta, args.rope_scaling
