"""Architecture description of a Llama-family decoder, read from and written to HF `config.json`.

`ModelArgs` is the one place that knows the three supported families and their differences:

| family  | architecture        | q/k/v bias        | o bias          | MLP bias   |
|---------|---------------------|-------------------|-----------------|------------|
| llama   | LlamaForCausalLM    | `attention_bias`  | `attention_bias`| `mlp_bias` |
| mistral | MistralForCausalLM  | no                | no              | no         |
| qwen2   | Qwen2ForCausalLM    | yes               | no              | no         |

RoPE settings are normalised from both config styles real checkpoints use (docs/reference.md, section 8):
transformers v4 (`rope_theta` + `rope_scaling`) and v5 (`rope_parameters`). Internally we keep
`rope_theta` plus `rope_scaling` (a dict with `rope_type` and its parameters, or None).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from longcpt.errors import LongcptError
from longcpt.model.attention import DEFAULT_KIND

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# Parameters each rope type needs (beyond rope_theta); checked so a typo fails at load time.
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelArgs:
    """Shape and numerics of the decoder plus how it attends; see the module docstring."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # How the model attends and rotates; not part of the HF architecture.
    attention: str = DEFAULT_KIND
    attention_options: dict[str, Any] = field(default_factory=dict)
    rope_precision: str = "fp32"
    # The source config.json, kept so that export writes back every field we do not model.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def context_length(self) -> int:
        """Tokens the model is meant to read with its RoPE scaling.

        `max_position_embeddings`, or the pretraining length times the scaling factor when that is
        longer: linear and dynamic configs keep the pretraining length in `max_position_embeddings`
        (Vicuna-16K: 4096 x 4), YaRN and llama3 configs name it `original_max_position_embeddings`
        and usually state the extended length already (Llama 3.1: 8192 x 8 <= 131072).
        """
        scaling = self.rope_scaling or {}
        if "factor" not in scaling:
            return self.max_position_embeddings
        base = scaling.get("original_max_position_embeddings") or self.max_position_embeddings
        return max(self.max_position_embeddings, int(base * float(scaling["factor"])))

    def with_rope(
        self, theta: float | None = None, scaling: dict[str, Any] | None = None, source: str = "rope_scaling override"
    ) -> ModelArgs:
        """These arguments with RoPE overrides (context extension), or unchanged where None.

        `scaling` is checked and completed as a config.json's (`normalise_rope_scaling`).

        Raises:
            LongcptError: an unsupported rope type or a missing parameter.
        """
        changes: dict[str, Any] = {}
        if theta is not None:
            changes["rope_theta"] = float(theta)
        if scaling is not None:
            changes["rope_scaling"] = normalise_rope_scaling(scaling, self.max_position_embeddings, source)
        return dataclasses.replace(self, **changes) if changes else self

    def run_as(self, attention: str, options: dict[str, Any] | None = None, rope_precision: str = "fp32") -> ModelArgs:
        """This architecture run with an attention kind, its options and a RoPE precision: the
        runtime choices, which are not part of the Hugging Face architecture (a new `ModelArgs`)."""
        return dataclasses.replace(self, attention=attention, attention_options=dict(options or {}),
                                   rope_precision=rope_precision)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Read a transformers `config.json` dict (v4 or v5 style).

        Raises:
            LongcptError: unsupported architecture or a field we cannot honour, naming it.
        """
        cfg = copy.deepcopy(cfg)
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            archs = cfg.get("architectures")
            raise LongcptError(
                f"{source}: model_type={model_type!r} (architectures={archs}) is not supported; "
                f"longcpt supports {', '.join(f'{k} ({v})' for k, v in FAMILIES.items())}."
            )
        problems = []
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act={act!r} (only 'silu' is supported)")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"partial_rotary_factor={cfg['partial_rotary_factor']} (only 1.0 is supported)")
        if model_type == "qwen2" and cfg.get("use_sliding_window", False):
            problems.append("use_sliding_window=true (sliding-window attention is not supported)")
        if problems:
            raise LongcptError(f"{source}: unsupported setting(s): " + "; ".join(problems))

        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        rope_theta, rope_scaling = _read_rope(cfg, source)
        if model_type == "llama":
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            mlp_bias = bool(cfg.get("mlp_bias", False))
        elif model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = mlp_bias = False
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            model_type=model_type,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            initializer_range=cfg.get("initializer_range", 0.02),
            hf_config=cfg,
        )

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """The `config.json` dict for export, loadable by transformers v4 and v5.

        Both RoPE styles are written and agree: v5 reads `rope_parameters`, v4 reads `rope_theta`
        and `rope_scaling`.
        """
        cfg = {k: v for k, v in self.hf_config.items() if k not in _DERIVED_KEYS}
        cfg.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
            rope_theta=self.rope_theta,
            rope_scaling=copy.deepcopy(self.rope_scaling),
            rope_parameters={
                "rope_theta": self.rope_theta,
                **(self.rope_scaling or {"rope_type": "default"}),
            },
        )
        if self.model_type == "llama":
            cfg.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "qwen2":
            cfg.setdefault("use_sliding_window", False)
        if dtype is not None:
            cfg["torch_dtype"] = cfg["dtype"] = dtype
        cfg.pop("quantization_config", None)
        return cfg


# Keys rewritten on export from our own fields (the v4 `type` alias included).
_DERIVED_KEYS = {"rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "dtype", "transformers_version"}


def normalise_rope_scaling(
    scaling: dict[str, Any], max_position_embeddings: int, source: str
) -> dict[str, Any] | None:
    """A user's `rope_scaling` override checked and completed as if read from a config.json.

    Example: {"type": "yarn", "factor": 4} with max_position_embeddings 4096 ->
    {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}; {} -> None.

    Raises:
        LongcptError: an unsupported rope type or a missing parameter, naming `source`.
    """
    return _read_rope({"rope_scaling": dict(scaling), "max_position_embeddings": max_position_embeddings}, source)[1]


def _read_rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """Normalise v4 (`rope_theta`, `rope_scaling`) and v5 (`rope_parameters`) RoPE settings."""
    params = cfg.get("rope_parameters")
    if params and any(isinstance(v, dict) for v in params.values()):
        raise LongcptError(f"{source}: per-layer-type rope_parameters are not supported ({params})")
    scaling = dict(params) if params else dict(cfg.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise LongcptError(
            f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    missing = [k for k in ROPE_REQUIRED[rope_type] if scaling.get(k) is None]
    if missing:
        raise LongcptError(f"{source}: rope type {rope_type!r} needs {', '.join(missing)} in rope_scaling")
    if rope_type in ("yarn", "llama3"):
        # transformers defaults the pretraining length to max_position_embeddings (and prefers a
        # top-level original_max_position_embeddings, as Phi-3 writes it).
        top = cfg.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = top or scaling.get(
            "original_max_position_embeddings"
        ) or cfg.get("max_position_embeddings", 4096)
    return theta, {"rope_type": rope_type, **scaling}
