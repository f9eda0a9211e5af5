"""Read Hugging Face model folders into longcpt models (`longcpt.from_pretrained`).

Import reads `config.json` (transformers v4 or v5 style) and weights from `model.safetensors`,
sharded safetensors with `model.safetensors.index.json`, or `pytorch_model.bin` (sharded too),
loaded with `weights_only=True`. Parameter names are transformers' own, so the weight map is the
identity; keys we do not know, or keys we need and do not find, fail with their names.

Writing folders is `longcpt.export.hf` (`longcpt.save_pretrained`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from longcpt.errors import LongcptError
from longcpt.model.attention import kind_spec
from longcpt.model.config import ModelArgs, normalise_rope_scaling
from longcpt.model.infini_config import split_config
from longcpt.model.llama import CausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Keys old checkpoints carry that hold nothing we need (RoPE tables are recomputed).
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise LongcptError(f"{path}: no config.json; expected a Hugging Face model folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LongcptError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, whatever the weight format.

    Raises:
        LongcptError: no weight file, or an index naming a missing shard.
    """
    path = Path(path)
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise LongcptError(f"{index}: shard(s) {', '.join(missing)} not found in {path}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(path / shard))
            return state
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return _load_bin(path / "pytorch_model.bin")
    raise LongcptError(
        f"{path}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin, pytorch_model.bin.index.json)"
    )


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def build_model(args: ModelArgs, state: dict[str, torch.Tensor] | None = None, source: str = "") -> CausalLM:
    """Instantiate `CausalLM(args)` and load `state` (strictly), or keep the fresh init if None.

    Parameters the attention kind adds (e.g. Infini gates under `...self_attn.core.`) may be absent
    from `state`; they keep their own initialisation.
    """
    if state is None:
        return CausalLM(args)
    with torch.device("meta"):
        model = CausalLM(args)
    expected = set(model.state_dict())
    if args.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    given = {k for k in state if not _IGNORED_KEYS.match(k)}
    unknown = sorted(given - expected)
    missing = sorted(k for k in expected - given if ".core." not in k)
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown keys {_few(unknown)}")
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        raise LongcptError(
            f"{source or 'state dict'}: weights do not match a {args.architecture} with this config: "
            + "; ".join(parts)
        )
    model.to_empty(device="cpu")
    model.tie_weights()
    model.load_state_dict({k: state[k] for k in given}, strict=False)
    if expected - given:  # the attention kind's own new parameters: initialise them
        for block in model.model.layers:
            block.self_attn.core.reset_parameters()
    return model


def _few(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def from_pretrained(
    path: str | os.PathLike,
    attention: str | None = None,
    dtype: torch.dtype | str | None = None,
    rope_precision: str = "fp32",
    rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | None = None,
    **attention_options: Any,
) -> CausalLM:
    """Load an HF folder as a longcpt model.

    Args:
        path: folder with `config.json` and weights.
        attention: attention kind (`full`, `intra_doc`, `anchor`, `infini`); default: `infini`
            with its stored options for an exported Infini folder, else `full`.
        dtype: parameter dtype (torch dtype or "fp32"/"bf16"/"fp16"); default: as stored.
        rope_precision: "fp32" (the BF16 RoPE fix) or "model" (transformers' path).
        rope_theta, rope_scaling: context-extension overrides (ABF / an HF rope_scaling dict,
            checked like config.json's: e.g. {"rope_type": "dynamic", "factor": 2.0}).
        **attention_options: options of the attention kind by their recipe names
            (e.g. segment_len=2048, memory_update="delta").

    Raises:
        LongcptError: missing files, unsupported architecture, mismatching weights.
    """
    path = Path(path)
    config, infini_options = split_config(read_config(path), source=str(path / "config.json"))
    args = ModelArgs.from_hf_config(config, source=str(path / "config.json"))
    attention = attention or ("infini" if infini_options is not None else "full")
    if infini_options is not None and kind_spec(attention).inference_memory:
        raise LongcptError(
            f"{path}: attention={attention!r} replaces softmax attention over a KV cache, but this is an Infini "
            "model, whose attention is its compressive memory (already constant in length); use it as `infini`"
        )
    if attention == "infini":
        attention_options = {**(infini_options or {}), **attention_options}
    args.attention, args.attention_options, args.rope_precision = attention, dict(attention_options), rope_precision
    if rope_theta is not None:
        args.rope_theta = float(rope_theta)
    if rope_scaling is not None:
        args.rope_scaling = normalise_rope_scaling(rope_scaling, args.max_position_embeddings, "rope_scaling override")
    state = load_state_dict(path)
    if infini_options is not None and attention != "infini":  # e.g. an ablation without memory
        state = {k: v for k, v in state.items() if not k.endswith(".core.gate")}
    model = build_model(args, state, source=str(path))
    stored = args.hf_config.get("dtype") or args.hf_config.get("torch_dtype")
    target = _as_dtype(dtype) if dtype is not None else _as_dtype(stored) if stored else None
    return model.to(target) if target is not None else model


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise LongcptError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return names[dtype]
