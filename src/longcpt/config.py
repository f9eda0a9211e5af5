"""Recipes: dataclasses are the schema, the YAML recipe overrides them, `key=value` overrides both.

    cfg = load_config("recipes/tiny_cpu.yaml", ["trainer.max_steps=20", "attention.kind=full"])

`load_config` collects every problem before failing (unknown keys with a "did you mean",
values of the wrong type, values out of range), each naming the key, the value and the fix, and
raises one `ConfigError`; then it returns the recipe resolved (`resolve`: the attention kind's
options completed with its defaults). `validate` only reports. The resolved config is saved in
the run directory (`save_config`).

The schema is `Config`, assembled here from its sections. A section owned elsewhere lives with
its owner and brings its own checks (a `problems()` method): the attention kind's options are the
kind's (`longcpt.model.attention`), the `data.task` names are the DataModule registry's
(`longcpt.data.datamodule`), and `longcpt namm train` loads `longcpt.namm.config.NammRecipe`,
this schema plus its `namm:` section. Keys that moved keep working for a while (`DEPRECATED`,
with a warning naming the new key).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from longcpt.errors import ConfigError, DeprecatedKeyWarning, LongcptError
from longcpt.fsio import atomic_write_text
from longcpt.lora.config import LoraConfig

TRAINER_PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")


@dataclass
class ModelConfig:
    pretrained: str | None = None  # HF folder to continue from
    config: dict[str, Any] = field(default_factory=dict)  # HF-style fields for a model from scratch
    tokenizer: str | None = None  # tokenizer folder (defaults to `pretrained`)
    lora: LoraConfig | None = None  # LoRA adapters (longcpt.lora); null: every parameter is trained
    fused_kernels: str = "none"  # none | liger: Liger Kernel's RMSNorm and SwiGLU on CUDA (longcpt.model.fused)


@dataclass
class AttentionConfig:
    """`attention.kind` and that kind's options.

    In a recipe the options sit next to `kind` (`attention.segment_len: 2048`); the kind declares
    their names, defaults and constraints (`longcpt.model.attention`), and `resolve` fills
    `options` with the resolved values. Options of another registered kind are ignored, so one
    recipe can switch kinds with `attention.kind=...` on the command line.
    """

    kind: str = "anchor"  # a registered attention kind: full | intra_doc | anchor | infini | ...
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RopeConfig:
    """RoPE: overrides of the model's own settings (context extension), and how it is computed."""

    theta: float | None = None  # base override for context extension (ABF), e.g. 500000
    scaling: dict[str, Any] | None = None  # HF rope_scaling dict override (linear, dynamic, yarn, llama3)
    precision: str = "fp32"  # fp32 (rotation in fp32: the BF16 fix) | model


@dataclass
class DataConfig:
    train: str | None = None  # output of data_prep/prepare_corpus.py (or a task data set)
    val: str | None = None
    task: str = "pretrain"  # a registered DataModule: pretrain | passkey | booksum | ...
    seq_len: int = 4096
    packing: str = "chunk"  # chunk | bfd
    micro_batch_size: int = 1
    num_workers: int = 2
    val_batches: int = 8  # validation windows evaluated each time
    bfd_buffer: int = 1024  # packing=bfd: documents sorted and placed together (memory bound)
    train_on_input: bool = False  # task fine-tuning: loss on the prompt too, not only the answer
    pack_examples: bool = False  # task fine-tuning: several examples per row (best-fit decreasing)


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
    compile: str = "none"  # none | blocks (each decoder block, regional) | model (longcpt.model.compile)
    loggers: list[str] = field(default_factory=lambda: ["csv"])  # csv | tensorboard | wandb | mlflow (longcpt.logs)
    export_hf: bool = False  # write out_dir/hf at the end
    timeout_minutes: float = 30.0  # a collective waiting longer (a hung or dead rank) becomes an error
    max_restarts: int = 3  # under SLURM: requeues of a job after such an error


@dataclass
class StrategyConfig:
    name: str = "auto"  # auto | ddp | deepspeed
    stage: int = 2  # DeepSpeed ZeRO stage: 2 | 3
    offload_optimizer: bool = False
    offload_parameters: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed settings, passed through
    sequence_parallel: int = 1  # ranks sharing one window (DeepSpeed-Ulysses); 1 = off


@dataclass
class Config:
    """The schema of a training recipe (`longcpt train`, `plan`, `doctor`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)


# Keys that moved, old -> new: still read (with a `DeprecatedKeyWarning`), written the new way.
DEPRECATED = {
    "model.rope_theta": "rope.theta",
    "model.rope_scaling": "rope.scaling",
    "optim.gate_lr": "attention.gate_lr",
}
# Fields holding free-form dicts whose keys are not ours to check.
_FREE_FORM = {"model.config", "rope.scaling", "model.rope_scaling", "strategy.deepspeed", "attention.options"}


def _parse_override(override: str) -> tuple[dict, str | None]:
    """One `key=value` override as a nested dict (the value read as YAML, as OmegaConf reads it), or
    the problem with it."""
    if "=" not in override or override.startswith("="):
        return {}, f"override {override!r}: expected key=value (e.g. trainer.max_steps=100)"
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([override])), None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        reason = " ".join(str(getattr(e, "problem", None) or e).split())
        return {}, (f"override {override!r}: the value is not valid YAML ({reason}); close every bracket and "
                    "quote the whole override for the shell, e.g. 'model.config={model_type: llama, hidden_size: 64}'")


def load_config(
    recipe: str | Path | None, overrides: list[str] = (), check_paths: bool = False, schema: type = Config
) -> Config:
    """Merge schema defaults, a YAML recipe and `key=value` overrides, validate, and resolve.

    Args:
        recipe: YAML file, or None for the defaults alone.
        overrides: OmegaConf dotlist (`trainer.max_steps=10`).
        check_paths: also require the data/model paths to exist (done by `longcpt train`).
        schema: `Config`, or a command's extension of it (`longcpt.namm.config.NammRecipe`).

    Returns:
        The resolved recipe (`resolve`), an instance of `schema`.

    Raises:
        ConfigError: every problem found, each with key, value and fix.
        LongcptError: the recipe file is missing or is not valid YAML.
    """
    problems: list[str] = []
    layers: list[tuple[str, dict]] = []
    if recipe is not None:
        layers.append((str(recipe), _read_yaml(Path(recipe))))
    for override in overrides:
        parsed, problem = _parse_override(override)
        if problem:
            problems.append(problem)
        else:
            layers.append(("command line", parsed))

    merged = OmegaConf.structured(schema)
    for origin, data in layers:
        for key, value in _leaves(data):
            key = _attention_option_key(_current_key(key, origin))
            unknown = _unknown_key(key, schema)
            if unknown:
                problems.append(f"{key} ({origin}): unknown key{unknown}")
                continue
            try:
                _create_parents(merged, key, schema)
                OmegaConf.update(merged, key, value, merge=True)
            except OmegaConfBaseException as e:
                expected = _field_type(key, schema)
                problems.append(f"{key}={value!r} ({origin}): expected {expected} ({type(e).__name__})")
    cfg: Config = OmegaConf.to_object(merged)
    try:
        validate(cfg, check_paths=check_paths)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return resolve(cfg)


def _current_key(key: str, origin: str) -> str:
    """`key`, or the key it moved to (`DEPRECATED`), saying so once per use."""
    new = DEPRECATED.get(key)
    if new is None:
        return key
    warnings.warn(f"{key} ({origin}) is deprecated: write {new} instead (the old key still works in this version)",
                  DeprecatedKeyWarning, stacklevel=3)
    return new


def _attention_option_key(key: str) -> str:
    """`attention.<name>` -> `attention.options.<name>`: options sit next to `kind` in recipes."""
    section, _, name = key.partition(".")
    if section == "attention" and name and name.split(".")[0] not in ("kind", "options"):
        return f"attention.options.{name}"
    return key


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


def _create_parents(cfg, key: str, schema: type) -> None:
    """Give an optional section that is still null (`model.lora`) its defaults before one of its keys
    is set (`model.lora.r=8` on the command line)."""
    parts = key.split(".")
    node: Any = schema
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(node):
            return
        node = _section(_hints(node)[part])
        prefix = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(node) and OmegaConf.select(cfg, prefix) is None:
            OmegaConf.update(cfg, prefix, {}, merge=True)


def _section(hint: Any) -> Any:
    """The dataclass of an optional section (`LoraConfig | None` -> `LoraConfig`), else `hint`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else hint


def _unknown_key(key: str, schema: type = Config) -> str:
    """'' if `key` exists in the schema, else ' (did you mean ...?)' text."""
    parts = key.split(".")
    node: Any = schema
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return ""  # inside a free-form dict
        hints = _hints(node)
        if part not in hints:
            where = ".".join(parts[:i]) or "top level"
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close[:1])}?" if close else ""
            return f" (not a key of {where}; valid: {', '.join(hints)}{hint})"
        node = _section(hints[part])
    return ""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_type(key: str, schema: type = Config) -> str:
    node: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return "a value"
        node = _section(_hints(node)[part])
    return getattr(node, "__name__", str(node))


def validate(cfg: Config, check_paths: bool = False) -> None:
    """Check every value; raise one ConfigError listing all problems (key, value, fix). Changes nothing.

    The attention kind, the DataModule registry and the strategy own their rules
    (`longcpt.model.attention`, `longcpt.data.datamodule`, `longcpt.strategies`), and a section
    owned elsewhere brings its own `problems()`; this function asks them all, so every problem is
    found here, before anything is built.

    Args:
        cfg: the merged recipe.
        check_paths: also require the data/model/tokenizer paths to exist.
    """
    from longcpt.strategies import strategy_problems

    problems = (
        _model_problems(cfg.model)
        + _rope_problems(cfg.rope)
        + _attention_problems(cfg)
        + _choice_problems(cfg)
        + _minimum_problems(cfg)
        + _other_problems(cfg)
        + strategy_problems(cfg)
        + _vocabulary_problems(cfg.model)
    )
    for f in dataclasses.fields(cfg):  # sections owned elsewhere (the namm: section)
        section = getattr(cfg, f.name)
        if callable(getattr(section, "problems", None)):
            problems += section.problems()
    if check_paths:
        problems += _path_problems(cfg)
    if problems:
        raise ConfigError(problems)


def resolve(cfg: Config) -> Config:
    """`cfg` with its attention kind's options completed with the kind's defaults (a new config).

    The only place a recipe's options are resolved (`longcpt.model.attention.resolve_options`);
    options of other kinds are left out. `cfg` must be valid (`validate`).
    """
    from longcpt.model.attention import kind_spec, resolve_options

    spec = kind_spec(cfg.attention.kind, "attention.kind")
    mine = {k: v for k, v in cfg.attention.options.items() if k in spec.options}
    options = resolve_options(cfg.attention.kind, mine, prefix="attention.")
    return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, options=options))


def choice_problems(key: str, value: Any, options: tuple) -> list[str]:
    """[] when `value` is one of `options`, else the problem naming them (and the closest one)."""
    if value in options:
        return []
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return [f"{key}={value!r}: must be one of {', '.join(map(str, options))}{hint}"]


def minimum_problems(section: Any, prefix: str, minimums: dict[str, float]) -> list[str]:
    """The keys of `section` below their inclusive lower bound (`minimums`: dotted key -> bound)."""
    problems = []
    for key, low in minimums.items():
        value = functools.reduce(getattr, key.split("."), section)
        if value < low:
            problems.append(f"{prefix}{key}={value!r}: must be >= {low}")
    return problems


def _model_problems(model: ModelConfig) -> list[str]:
    problems = []
    if model.pretrained is None and not model.config:
        problems.append("model.pretrained=null and model.config={}: set model.pretrained to an HF folder "
                        "or model.config to HF-style fields (hidden_size, num_hidden_layers, ...)")
    if model.pretrained is None and model.config and model.tokenizer is None:
        problems.append("model.tokenizer=null: a model built from model.config needs a tokenizer folder")
    if model.lora is not None:
        problems += model.lora.problems("model.lora.")
        if model.pretrained is None:
            problems.append("model.lora is set but model.pretrained=null: LoRA adapts the frozen weights of a pretrained "
                            "model, which export and resume read again; set model.pretrained to its folder (or remove "
                            "model.lora to train a model from scratch)")
    return problems


def _rope_problems(rope: RopeConfig) -> list[str]:
    from longcpt.model.rope import ROPE_PRECISIONS

    problems = choice_problems("rope.precision", rope.precision, ROPE_PRECISIONS)
    if rope.theta is not None and rope.theta <= 0:
        problems.append(f"rope.theta={rope.theta}: must be > 0 (e.g. 500000 for ABF context extension)")
    if rope.scaling is not None:
        from longcpt.model.config import normalise_rope_scaling

        try:  # the same check as a config.json's (any length completes yarn/llama3 here)
            normalise_rope_scaling(rope.scaling, 4096, "rope.scaling")
        except LongcptError as e:
            problems.append(str(e))
    return problems


def _attention_problems(cfg: Config) -> list[str]:
    """The kind exists and may be trained; its options are known and valid."""
    from longcpt.model.attention import KINDS

    attention = cfg.attention
    problems = []
    trainable = tuple(name for name, spec in KINDS.items() if spec.trainable)
    if attention.kind not in KINDS:
        return problems + choice_problems("attention.kind", attention.kind, trainable)
    spec = KINDS[attention.kind]
    if not spec.trainable:
        problems.append(f"attention.kind={attention.kind!r}: an inference-time memory, not trainable; train with "
                        f"one of {', '.join(trainable)} and evaluate with --attention {attention.kind}")
    from longcpt.model.attention import option_problems

    everyone = {name for other in KINDS.values() for name in other.options}
    typos = [k for k in attention.options if k not in everyone]
    for key in typos:
        close = difflib.get_close_matches(key, sorted(everyone), n=1)
        hint = f"; did you mean attention.{close[0]}?" if close else ""
        problems.append(f"attention.{key}: not an option of any attention kind (options of {attention.kind!r}: "
                        f"{', '.join(spec.options) or 'none'}){hint}")
    mine = {k: v for k, v in attention.options.items() if k in spec.options}  # other kinds' options: ignored
    _, option_errors = option_problems(attention.kind, mine, prefix="attention.")
    return problems + option_errors


# Inclusive lower bounds of the numeric keys.
_MINIMUMS = {
    "data.seq_len": 2, "data.micro_batch_size": 1, "data.num_workers": 0, "data.val_batches": 1,
    "data.bfd_buffer": 1, "optim.weight_decay": 0, "optim.warmup_steps": 0, "optim.grad_clip": 0,
    "optim.accumulate_grad_batches": 1, "trainer.max_steps": 1, "trainer.num_nodes": 1,
    "trainer.save_every_n_steps": 1, "trainer.keep_last_k": 1, "trainer.log_every_n_steps": 1,
    "trainer.val_every_n_steps": 1, "trainer.max_restarts": 0,
}


def _minimum_problems(cfg: Config) -> list[str]:
    return minimum_problems(cfg, "", _MINIMUMS)


def _choice_problems(cfg: Config) -> list[str]:
    from longcpt.data.datamodule import task_problems
    from longcpt.data.packing import PACKING_STRATEGIES
    from longcpt.model.compile import COMPILE_CHOICES

    return (
        task_problems(cfg.data.task)
        + choice_problems("data.packing", cfg.data.packing, PACKING_STRATEGIES)
        + choice_problems("trainer.accelerator", cfg.trainer.accelerator, ("cpu", "gpu", "auto"))
        + choice_problems("trainer.precision", cfg.trainer.precision, TRAINER_PRECISIONS)
        + choice_problems("trainer.compile", cfg.trainer.compile, COMPILE_CHOICES)
    )


def _other_problems(cfg: Config) -> list[str]:
    """The rules that are not a bound or a choice."""
    from longcpt.logs import logger_problems
    from longcpt.model.fused import fused_kernels_problems

    optim, devices = cfg.optim, cfg.trainer.devices
    problems = logger_problems(list(cfg.trainer.loggers))
    problems += fused_kernels_problems(cfg.model.fused_kernels, cfg.trainer.accelerator)
    if optim.lr <= 0:
        problems.append(f"optim.lr={optim.lr}: must be > 0 (e.g. 2.0e-5)")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        problems.append(f"optim.betas={optim.betas}: must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not 0 <= optim.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio={optim.min_lr_ratio}: must be in [0, 1]")
    if not (devices == "auto" or (isinstance(devices, int) and devices >= 1)):
        problems.append(f"trainer.devices={devices!r}: must be a positive integer or 'auto'")
    if cfg.data.task == "pretrain" and cfg.data.train_on_input:
        problems.append("data.train_on_input=true: applies to task fine-tuning only (data.task: passkey, booksum, "
                        "...); pretraining already puts the loss on every token. Remove it or set data.task")
    if cfg.data.task == "pretrain" and cfg.data.pack_examples:
        problems.append("data.pack_examples=true: applies to task fine-tuning only (data.task: passkey, booksum, "
                        "...); pretraining windows are packed by data.packing. Remove it or set data.task")
    if cfg.data.pack_examples and _attends_across_documents(cfg.attention.kind):
        problems.append(f"data.pack_examples=true with attention.kind={cfg.attention.kind}: examples sharing a row "
                        f"would see each other; use a document-masking kind ({', '.join(_masking_kinds())}) or "
                        "remove data.pack_examples")
    if not cfg.trainer.timeout_minutes > 0:
        problems.append(f"trainer.timeout_minutes={cfg.trainer.timeout_minutes!r}: must be > 0 (minutes a collective "
                        "may wait for the slowest rank, e.g. 30; longer than the slowest step or checkpoint save)")
    return problems


def _attends_across_documents(kind: str) -> bool:
    from longcpt.model.attention import KINDS

    return kind in KINDS and KINDS[kind].hooks.across_documents


def _masking_kinds() -> list[str]:
    """Trainable kinds that keep the documents of a row apart."""
    from longcpt.model.attention import KINDS

    return [name for name, spec in KINDS.items() if spec.trainable and not spec.hooks.across_documents]


def _path_problems(cfg: Config) -> list[str]:
    """The data and model paths exist."""
    data, model = cfg.data, cfg.model
    problems = []
    if data.train is None:
        problems.append("data.train=null: set it to a prepared data set (python data_prep/prepare_corpus.py ...)")
    paths = (("data.train", data.train), ("data.val", data.val), ("model.pretrained", model.pretrained),
             ("model.tokenizer", model.tokenizer))
    return problems + [f"{key}={value!r}: path does not exist" for key, value in paths
                       if value is not None and not Path(value).exists()]


def _vocabulary_problems(model: ModelConfig) -> list[str]:
    """More tokens than embedding rows would give ids without embeddings (read from the files when
    they exist; a missing folder is `_path_problems`'s to report)."""
    import json

    tokenizer = Path(model.tokenizer or model.pretrained or "") / "tokenizer.json"
    vocab = model.config.get("vocab_size")
    if model.pretrained is not None and (Path(model.pretrained) / "config.json").is_file():
        try:
            vocab = json.loads((Path(model.pretrained) / "config.json").read_text()).get("vocab_size", vocab)
        except json.JSONDecodeError as e:
            return [f"model.pretrained={model.pretrained!r}: config.json line {e.lineno}: invalid JSON ({e.msg})"]
    if vocab is None or not tokenizer.is_file():
        return []  # a model from model.config takes the tokenizer's size; loading reports the rest
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(tokenizer)).get_vocab_size(with_added_tokens=True)
    if n <= vocab:
        return []
    key = "model.tokenizer" if model.tokenizer else "model.pretrained"
    return [f"{key}: the tokenizer has {n} tokens but the model's vocab_size is {vocab}: use the model's own "
            "tokenizer (or a model.config.vocab_size at least that large)"]


def to_yaml(cfg: Config) -> str:
    """The recipe form of `cfg`: loadable again by `load_config` (attention options next to `kind`)."""
    data = OmegaConf.to_container(OmegaConf.structured(cfg))
    data["attention"] = {"kind": cfg.attention.kind, **cfg.attention.options}
    return OmegaConf.to_yaml(OmegaConf.create(data))


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (what actually ran) as YAML, atomically."""
    return atomic_write_text(path, to_yaml(cfg))
