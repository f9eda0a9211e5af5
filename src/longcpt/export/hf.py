"""Write longcpt models as Hugging Face folders (`longcpt.save_pretrained`, `longcpt export`).

A folder is written atomically (temporary sibling, then rename): `config.json`,
`model.safetensors` (sharded with an index above `max_shard_bytes`), `generation_config.json` and
the tokenizer files. A model exports as its source architecture (`LlamaForCausalLM`,
`MistralForCausalLM`, `Qwen2ForCausalLM`), loadable by plain transformers, unless its attention
kind has no transformers class: then the kind's `export` hook writes its own model type and
modeling code (Infini-attention's, `longcpt.model.attention.infini`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from longcpt.data.tokenizer import copy_tokenizer_files
from longcpt.errors import LongcptError
from longcpt.fsio import atomic_dir
from longcpt.model.attention import kind_spec
from longcpt.model.hf_io import DTYPE_NAMES, _as_dtype
from longcpt.model.llama import CausalLM


def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    tokenizer: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` as an HF folder at `path` (atomically; an existing folder is replaced whole).

    Args:
        model: a longcpt `CausalLM`.
        path: output folder.
        dtype: weight dtype in the folder; default: the model's.
        tokenizer: folder whose tokenizer files are copied alongside (its vocabulary must fit the
            model's embedding size).
        max_shard_bytes: shard size above which weights are split with an index.

    Returns:
        The output folder.
    """
    path = Path(path)
    target = _as_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    state = {
        k: v.detach().to(device="cpu", dtype=target).contiguous()
        for k, v in model.state_dict().items()
        if not (model.args.tie_word_embeddings and k == "lm_head.weight")
    }
    with atomic_dir(path) as tmp:
        _write_weights(state, tmp, max_shard_bytes)
        config = model.args.to_hf_config(dtype=DTYPE_NAMES[target])
        export = kind_spec(model.args.attention).hooks.export
        if export is not None:  # no transformers class: the kind's own model type and code
            config = export.write_config(config, model.args)
            export.write_files(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp, model.args.vocab_size)
    return path


def copy_tokenizer(src: str | os.PathLike, dst: Path, vocab_size: int) -> None:
    """Copy tokenizer files and check the vocabulary fits the embedding matrix.

    Raises:
        LongcptError: no tokenizer file in `src`, or more tokens than embedding rows.
    """
    src = Path(src)
    if not copy_tokenizer_files(src, dst):
        raise LongcptError(f"{src}: no tokenizer files found (tokenizer.json, tokenizer_config.json, ...)")
    if (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        n = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        if n > vocab_size:
            raise LongcptError(
                f"{src}: tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; "
                "export would produce ids without embeddings (do not add tokens without resizing)"
            )


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
