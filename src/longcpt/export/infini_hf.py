"""Infini-attention models as self-contained Hugging Face folders (SPEC section 7).

transformers has no Infini-attention, so an Infini model is exported with its own `model_type`
(`longcpt_infini`), an `auto_map`, and two files copied from `infini_remote/` that import only
torch and transformers:

    folder/
      config.json                       model_type=longcpt_infini, auto_map, infini_* fields
      configuration_longcpt_infini.py   LongcptInfiniConfig
      modeling_longcpt_infini.py        LongcptInfiniForCausalLM (same logits as longcpt)
      model.safetensors, generation_config.json, tokenizer files (as for every export)

so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it in plain
transformers, and `longcpt.from_pretrained(folder)` reads it back as an `infini` model.

config.json keeps every field of the source family's config (`ModelArgs.to_hf_config`) except
the RoPE keys, moved to `longcpt_rope` (transformers 4 and 5 treat `rope_scaling` /
`rope_parameters` differently on custom configs), and adds:
`infini_base_model_type` (llama | mistral | qwen2), `infini_qkv_bias`, `infini_o_bias`,
`infini_mlp_bias` (the family's bias layout, explicit) and the attention options
`infini_segment_len`, `infini_memory_update`, `infini_gate_init`, `infini_bptt_segments`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from longcpt.errors import LongcptError

MODEL_TYPE = "longcpt_infini"
ARCHITECTURE = "LongcptInfiniForCausalLM"
REMOTE_DIR = Path(__file__).parent / "infini_remote"
REMOTE_FILES = ("configuration_longcpt_infini.py", "modeling_longcpt_infini.py")
AUTO_MAP = {
    "AutoConfig": "configuration_longcpt_infini.LongcptInfiniConfig",
    "AutoModelForCausalLM": "modeling_longcpt_infini.LongcptInfiniForCausalLM",
}
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
_BIAS_KEYS = ("infini_qkv_bias", "infini_o_bias", "infini_mlp_bias")


def infini_config(base: dict[str, Any], args) -> dict[str, Any]:
    """config.json of an Infini model.

    Args:
        base: the source family's config (`args.to_hf_config(...)`).
        args: the model's `ModelArgs` (attention options, biases, RoPE).

    Returns:
        A new dict (see the module docstring).
    """
    from longcpt.model.attention.infini import infini_options  # the model package imports this module

    options = infini_options(dict(args.attention_options))
    cfg = {k: v for k, v in base.items() if k not in _ROPE_KEYS}
    cfg.update(
        model_type=MODEL_TYPE,
        architectures=[ARCHITECTURE],
        auto_map=dict(AUTO_MAP),
        infini_base_model_type=args.model_type,
        infini_qkv_bias=args.qkv_bias,
        infini_o_bias=args.o_bias,
        infini_mlp_bias=args.mlp_bias,
        longcpt_rope={"rope_theta": args.rope_theta, **(args.rope_scaling or {"rope_type": "default"})},
        **{f"infini_{key}": value for key, value in options.items()},
    )
    return cfg


def split_config(cfg: dict[str, Any], source: str = "config.json") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Separate an exported Infini config into its source family's config and its options.

    Args:
        cfg: a config.json dict (any model type).
        source: file name for error messages.

    Returns:
        (config for `ModelArgs.from_hf_config`, Infini options by recipe name), or
        (cfg, None) when `cfg` is not an Infini export.

    Raises:
        LongcptError: an Infini config without `infini_base_model_type`.
    """
    if cfg.get("model_type") != MODEL_TYPE:
        return cfg, None
    cfg = dict(cfg)
    base_type = cfg.pop("infini_base_model_type", None)
    if base_type is None:
        raise LongcptError(f"{source}: model_type={MODEL_TYPE!r} needs infini_base_model_type (llama, mistral or qwen2)")
    from longcpt.model.attention.infini import DEFAULT_OPTIONS

    options = {key: cfg.pop(f"infini_{key}") for key in DEFAULT_OPTIONS if f"infini_{key}" in cfg}
    for key in ("auto_map", "architectures", *_BIAS_KEYS):
        cfg.pop(key, None)
    cfg["rope_parameters"] = cfg.pop("longcpt_rope", None) or {"rope_type": "default"}
    cfg["model_type"] = base_type
    return cfg, options


def write_remote_code(folder: Path) -> None:
    """Copy the self-contained configuration and modeling files into an export folder."""
    for name in REMOTE_FILES:
        shutil.copy2(REMOTE_DIR / name, Path(folder) / name)
