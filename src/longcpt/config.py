"""Recipes: dataclasses are the schema, the YAML recipe overrides them, `key=value` overrides both.

    cfg = load_config("recipes/tiny_cpu.yaml", ["trainer.max_steps=20", "attention.kind=full"])

`load_config` collects every problem before failing (unknown keys with a "did you mean",
values of the wrong type, values out of range), each naming the key, the value and the fix, and
raises one `ConfigError`. The resolved config is saved in the run directory (`save_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from longcpt.errors import ConfigError, LongcptError
from longcpt.fsio import atomic_write_text

ATTENTION_KINDS = ("full", "intra_doc", "anchor", "infini")
PACKING = ("chunk", "bfd")
TASKS = ("pretrain", "passkey", "booksum")
PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")
STRATEGIES = ("auto", "ddp", "deepspeed")


@dataclass
class ModelConfig:
    pretrained: str | None = None  # HF folder to continue from
    config: dict[str, Any] = field(default_factory=dict)  # HF-style fields for a model from scratch
    tokenizer: str | None = None  # tokenizer folder (defaults to `pretrained`)
    rope_theta: float | None = None  # override for context extension (ABF)
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict override


@dataclass
class AttentionConfig:
    kind: str = "anchor"  # full | intra_doc | anchor | infini
    # Infini-attention (DESIGN.md section 4)
    segment_len: int = 2048
    memory_update: str = "delta"  # linear | delta
    bptt_segments: int = 2  # segments kept in one truncated-backprop window
    gate_init: float = -2.5  # sigmoid(-2.5) = 0.08: memory starts small but trainable


@dataclass
class RopeConfig:
    precision: str = "fp32"  # fp32 (rotation in fp32: the BF16 fix) | model


@dataclass
class DataConfig:
    train: str | None = None  # output of data_prep/prepare_corpus.py (or a task data set)
    val: str | None = None
    task: str = "pretrain"  # pretrain | passkey | booksum
    seq_len: int = 4096
    packing: str = "chunk"  # chunk | bfd
    micro_batch_size: int = 1
    num_workers: int = 2
    val_batches: int = 8  # validation windows evaluated each time
    bfd_buffer: int = 1024  # packing=bfd: documents sorted and placed together (memory bound)
    train_on_input: bool = False  # task fine-tuning: loss on the prompt too, not only the answer


@dataclass
class OptimConfig:
    lr: float = 2.0e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping
    accumulate_grad_batches: int = 1
    gate_lr: float = 1.0e-2  # Infini gates: own group, no weight decay (nanotron exp57)


@dataclass
class TrainerConfig:
    out_dir: str = "runs/default"
    max_steps: int = 1000
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = "auto"  # int or "auto"
    num_nodes: int = 1
    precision: str = "bf16-mixed"  # bf16-mixed | bf16-true | 32-true
    seed: int = 0
    resume: bool = True  # same out_dir -> continue from checkpoints/last
    save_every_n_steps: int = 200
    keep_last_k: int = 2
    log_every_n_steps: int = 10
    val_every_n_steps: int = 200
    activation_checkpointing: bool = False
    export_hf: bool = False  # write out_dir/hf at the end


@dataclass
class StrategyConfig:
    name: str = "auto"  # auto | ddp | deepspeed
    stage: int = 2  # DeepSpeed ZeRO stage: 2 | 3
    offload_optimizer: bool = False
    offload_parameters: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed settings, passed through


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)


# Fields holding free-form dicts whose keys are not ours to check.
_FREE_FORM = {"model.config", "model.rope_scaling", "strategy.deepspeed"}


def load_config(recipe: str | Path | None, overrides: list[str] = (), check_paths: bool = False) -> Config:
    """Merge schema defaults, a YAML recipe and `key=value` overrides, then validate.

    Args:
        recipe: YAML file, or None for the defaults alone.
        overrides: OmegaConf dotlist (`trainer.max_steps=10`).
        check_paths: also require the data/model paths to exist (done by `longcpt train`).

    Raises:
        ConfigError: every problem found, each with key, value and fix.
        LongcptError: the recipe file is missing or is not valid YAML.
    """
    problems: list[str] = []
    layers: list[tuple[str, dict]] = []
    if recipe is not None:
        layers.append((str(recipe), _read_yaml(Path(recipe))))
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    problems += [f"override {o!r}: expected key=value (e.g. trainer.max_steps=100)" for o in bad]
    good = [o for o in overrides if o not in bad]
    if good:
        layers.append(("command line", OmegaConf.to_container(OmegaConf.from_dotlist(good))))

    merged = OmegaConf.structured(Config)
    for origin, data in layers:
        for key, value in _leaves(data):
            unknown = _unknown_key(key)
            if unknown:
                problems.append(f"{key} ({origin}): unknown key{unknown}")
                continue
            try:
                OmegaConf.update(merged, key, value, merge=True)
            except OmegaConfBaseException as e:
                expected = _field_type(key)
                problems.append(f"{key}={value!r} ({origin}): expected {expected} ({type(e).__name__})")
    cfg: Config = OmegaConf.to_object(merged)
    try:
        validate(cfg, check_paths=check_paths)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise LongcptError(f"recipe {path} not found (pass a YAML file, e.g. recipes/tiny_cpu.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LongcptError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LongcptError(f"{path}: a recipe must be a mapping of sections (model:, data:, ...)")
    return data


def _leaves(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts to dotted keys, stopping at free-form fields."""
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _FREE_FORM and v:
            out += _leaves(v, key + ".")
        else:
            out.append((key, v))
    return out


def _unknown_key(key: str) -> str:
    """'' if `key` exists in the schema, else ' (did you mean ...?)' text."""
    parts = key.split(".")
    node: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return ""  # inside a free-form dict
        hints = _hints(node)
        if part not in hints:
            where = ".".join(parts[:i]) or "top level"
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close[:1])}?" if close else ""
            return f" (not a key of {where}; valid: {', '.join(hints)}{hint})"
        node = hints[part]
    return ""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_type(key: str) -> str:
    node: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return "a value"
        node = _hints(node)[part]
    return getattr(node, "__name__", str(node))


def validate(cfg: Config, check_paths: bool = False) -> None:
    """Check every value; raise one ConfigError listing all problems (key, value, fix)."""
    p: list[str] = []

    def choice(key: str, value: Any, options: tuple) -> None:
        if value not in options:
            close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            p.append(f"{key}={value!r}: must be one of {', '.join(map(str, options))}{hint}")

    def at_least(key: str, value: float, low: float) -> None:
        if value < low:
            p.append(f"{key}={value!r}: must be >= {low}")

    m, a, d, o, t, s = cfg.model, cfg.attention, cfg.data, cfg.optim, cfg.trainer, cfg.strategy
    if m.pretrained is None and not m.config:
        p.append("model.pretrained=null and model.config={}: set model.pretrained to an HF folder "
                 "or model.config to HF-style fields (hidden_size, num_hidden_layers, ...)")
    if m.pretrained is None and m.config and m.tokenizer is None:
        p.append("model.tokenizer=null: a model built from model.config needs a tokenizer folder")
    if m.rope_theta is not None and m.rope_theta <= 0:
        p.append(f"model.rope_theta={m.rope_theta}: must be > 0 (e.g. 500000 for ABF context extension)")
    if m.rope_scaling is not None:
        from longcpt.model.config import normalise_rope_scaling

        try:  # the same check as a config.json's (any length completes yarn/llama3 here)
            normalise_rope_scaling(m.rope_scaling, 4096, "model.rope_scaling")
        except LongcptError as e:
            p.append(str(e))
    choice("attention.kind", a.kind, ATTENTION_KINDS)
    choice("attention.memory_update", a.memory_update, ("linear", "delta"))
    at_least("attention.segment_len", a.segment_len, 1)
    at_least("attention.bptt_segments", a.bptt_segments, 1)
    choice("rope.precision", cfg.rope.precision, ("fp32", "model"))
    choice("data.task", d.task, TASKS)
    choice("data.packing", d.packing, PACKING)
    at_least("data.seq_len", d.seq_len, 2)
    at_least("data.micro_batch_size", d.micro_batch_size, 1)
    at_least("data.num_workers", d.num_workers, 0)
    at_least("data.val_batches", d.val_batches, 1)
    at_least("data.bfd_buffer", d.bfd_buffer, 1)
    if o.lr <= 0:
        p.append(f"optim.lr={o.lr}: must be > 0 (e.g. 2.0e-5)")
    if o.gate_lr <= 0:
        p.append(f"optim.gate_lr={o.gate_lr}: must be > 0 (e.g. 1.0e-2)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas={o.betas}: must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    at_least("optim.weight_decay", o.weight_decay, 0)
    at_least("optim.warmup_steps", o.warmup_steps, 0)
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    at_least("optim.grad_clip", o.grad_clip, 0)
    at_least("optim.accumulate_grad_batches", o.accumulate_grad_batches, 1)
    at_least("trainer.max_steps", t.max_steps, 1)
    choice("trainer.accelerator", t.accelerator, ("cpu", "gpu", "auto"))
    if not (t.devices == "auto" or (isinstance(t.devices, int) and t.devices >= 1)):
        p.append(f"trainer.devices={t.devices!r}: must be a positive integer or 'auto'")
    at_least("trainer.num_nodes", t.num_nodes, 1)
    choice("trainer.precision", t.precision, PRECISIONS)
    at_least("trainer.save_every_n_steps", t.save_every_n_steps, 1)
    at_least("trainer.keep_last_k", t.keep_last_k, 1)
    at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    at_least("trainer.val_every_n_steps", t.val_every_n_steps, 1)
    choice("strategy.name", s.name, STRATEGIES)
    choice("strategy.stage", s.stage, (2, 3))
    if s.name != "deepspeed" and (s.offload_optimizer or s.offload_parameters):
        p.append(f"strategy.offload_*=true with strategy.name={s.name!r}: offload needs strategy.name=deepspeed")
    if s.offload_parameters and s.stage != 3:
        p.append(f"strategy.offload_parameters=true with strategy.stage={s.stage}: parameter offload needs stage 3")
    if check_paths:
        if d.train is None:
            p.append("data.train=null: set it to a prepared data set (python data_prep/prepare_corpus.py ...)")
        for key, value in (("data.train", d.train), ("data.val", d.val), ("model.pretrained", m.pretrained),
                           ("model.tokenizer", m.tokenizer)):
            if value is not None and not Path(value).exists():
                p.append(f"{key}={value!r}: path does not exist")
    if p:
        raise ConfigError(p)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (what actually ran) as YAML, atomically."""
    return atomic_write_text(path, to_yaml(cfg))
