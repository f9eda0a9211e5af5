"""config.json of an exported Infini-attention model, in both directions.

transformers has no Infini-attention, so an Infini model is exported with its own `model_type`
(`longcpt_infini`) and an `auto_map` pointing at modeling files shipped in the folder
(`export.py` copies them). This module owns the mapping between that config.json and
`ModelArgs` + the Infini options: `infini_config` writes it (export), `split_config` reads it back
(`from_pretrained`).

config.json keeps every field of the source family's config (`ModelArgs.to_hf_config`) except
the RoPE keys, moved to `longcpt_rope` (transformers 4 and 5 treat `rope_scaling` /
`rope_parameters` differently on custom configs), and adds:
`infini_base_model_type` (llama | mistral | qwen2), `infini_qkv_bias`, `infini_o_bias`,
`infini_mlp_bias` (the family's bias layout, explicit) and every Infini option `<name>` as
`infini_<name>` (segment_len, memory_update, gate_init, bptt_segments).
"""

from __future__ import annotations

from typing import Any

from longcpt.errors import LongcptError
from longcpt.model.attention.infini.core import OPTIONS

MODEL_TYPE = "longcpt_infini"
ARCHITECTURE = "LongcptInfiniForCausalLM"
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
        args: the model's `ModelArgs` (resolved attention options, biases, RoPE).

    Returns:
        A new dict (see the module docstring).
    """
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
        **{f"infini_{key}": args.attention_options[key] for key in OPTIONS},
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
    options = {key: cfg.pop(f"infini_{key}") for key in OPTIONS if f"infini_{key}" in cfg}
    for key in ("auto_map", "architectures", *_BIAS_KEYS):
        cfg.pop(key, None)
    cfg["rope_parameters"] = cfg.pop("longcpt_rope", None) or {"rope_type": "default"}
    cfg["model_type"] = base_type
    return cfg, options
