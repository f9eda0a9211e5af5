"""Recipes: dataclasses are the schema, the YAML recipe overrides them, `key=value` overrides both.

    cfg = load_config("recipes/tiny_cpu.yaml", ["trainer.max_steps=20", "attention.kind=full"])

`load_config` collects every problem before failing (unknown keys with a "did you mean",
values of the wrong type, values out of range), each naming the key, the value and the fix, and
raises one `ConfigError`. The resolved config is saved in the run directory (`save_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from longcpt.errors import ConfigError, LongcptError
from longcpt.fsio import atomic_write_text

TASKS = ("pretrain", "passkey", "booksum")
TRAINER_PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")


@dataclass
class ModelConfig:
    pretrained: str | None = None  # HF folder to continue from
    config: dict[str, Any] = field(default_factory=dict)  # HF-style fields for a model from scratch
    tokenizer: str | None = None  # tokenizer folder (defaults to `pretrained`)
    rope_theta: float | None = None  # override for context extension (ABF)
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict override


@dataclass
class AttentionConfig:
    """`attention.kind` and that kind's options.

    In a recipe the options sit next to `kind` (`attention.segment_len: 2048`); the kind declares
    their names, defaults and constraints (`longcpt.model.attention`), and `validate` fills
    `options` with the resolved values. Options of another registered kind are ignored, so one
    recipe can switch kinds with `attention.kind=...` on the command line.
    """

    kind: str = "anchor"  # a registered attention kind: full | intra_doc | anchor | infini | ...
    options: dict[str, Any] = field(default_factory=dict)


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
class NammPasskeyConfig:
    """Passkey prompts NAMM evolution scores on (`longcpt.data.passkey`); keep them within the
    model's trained length and the seed apart from the evaluation's (0)."""

    lengths: list[int] = field(default_factory=lambda: [1024])  # each >= namm.update_every
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2  # prompts per (length, depth), new keys every generation; as many for validation
    split_digits: bool = False  # as the model was fine-tuned (make_passkey.py --split-digits)
    seed: int = 1


@dataclass
class NammConfig:
    """`longcpt namm train`: evolve a NAMM (`longcpt.namm`) for the frozen `model.pretrained`."""

    scorer: str = "bam"  # bam (the reference's) | mlp (this project's cheaper one)
    selection: str = "reference"  # reference (same count in every head of a layer) | per_head (score >= 0)
    hidden: int = 32  # BAM attention width
    update_every: int = 512  # tokens between evictions (a multiple of 16, the spectrogram hop)
    population: int = 32
    generations: int = 100
    sigma: float = 0.065  # initial CMA-ES step size
    covariance: str = "diagonal"  # diagonal (sep-CMA-ES, linear cost) | full (the reference's; O(n^3) per generation)
    seed: int = 0
    workers: int = 0  # processes evaluating the population; 0 = one per GPU, else one per CPU core
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    cache_weight: float = 0.0  # fitness -= cache_weight * kv_kept_mean: favours a smaller cache
    init: str | None = None  # policy file to start from (a previous stage), else the all-zero policy
    passkey: NammPasskeyConfig = field(default_factory=NammPasskeyConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    namm: NammConfig = field(default_factory=NammConfig)


# Fields holding free-form dicts whose keys are not ours to check.
_FREE_FORM = {"model.config", "model.rope_scaling", "strategy.deepspeed", "attention.options"}


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
            key = _attention_option_key(key)
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
    """Check every value; raise one ConfigError listing all problems (key, value, fix).

    Also completes `cfg.attention.options` with the kind's defaults (the kind declares them).
    The attention kind and the strategy own their rules (`longcpt.model.attention`,
    `longcpt.strategies`); this function asks them, so every problem is found here, before
    anything is built.

    Args:
        cfg: the merged recipe.
        check_paths: also require the data/model/tokenizer paths to exist.
    """
    from longcpt.strategies import strategy_problems

    problems = (
        _model_problems(cfg.model)
        + _attention_problems(cfg)
        + _choice_problems(cfg)
        + _minimum_problems(cfg)
        + _other_problems(cfg)
        + strategy_problems(cfg)
        + _vocabulary_problems(cfg.model)
        + _namm_problems(cfg.namm)
    )
    if check_paths:
        problems += _path_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _choice(key: str, value: Any, options: tuple) -> list[str]:
    if value in options:
        return []
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return [f"{key}={value!r}: must be one of {', '.join(map(str, options))}{hint}"]


def _model_problems(model: ModelConfig) -> list[str]:
    problems = []
    if model.pretrained is None and not model.config:
        problems.append("model.pretrained=null and model.config={}: set model.pretrained to an HF folder "
                        "or model.config to HF-style fields (hidden_size, num_hidden_layers, ...)")
    if model.pretrained is None and model.config and model.tokenizer is None:
        problems.append("model.tokenizer=null: a model built from model.config needs a tokenizer folder")
    if model.rope_theta is not None and model.rope_theta <= 0:
        problems.append(f"model.rope_theta={model.rope_theta}: must be > 0 (e.g. 500000 for ABF context extension)")
    if model.rope_scaling is not None:
        from longcpt.model.config import normalise_rope_scaling

        try:  # the same check as a config.json's (any length completes yarn/llama3 here)
            normalise_rope_scaling(model.rope_scaling, 4096, "model.rope_scaling")
        except LongcptError as e:
            problems.append(str(e))
    return problems


def _attention_problems(cfg: Config) -> list[str]:
    """The kind exists and may be trained; its options are known and valid (and get resolved)."""
    from longcpt.model.attention import KINDS
    from longcpt.model.rope import ROPE_PRECISIONS

    attention = cfg.attention
    problems = _choice("rope.precision", cfg.rope.precision, ROPE_PRECISIONS)
    trainable = tuple(name for name, spec in KINDS.items() if spec.trainable)
    if attention.kind not in KINDS:
        return problems + _choice("attention.kind", attention.kind, trainable)
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
    resolved, option_errors = option_problems(attention.kind, mine, prefix="attention.")
    attention.options = resolved
    return problems + option_errors


# Inclusive lower bounds of the numeric keys.
_MINIMUMS = {
    "data.seq_len": 2, "data.micro_batch_size": 1, "data.num_workers": 0, "data.val_batches": 1,
    "data.bfd_buffer": 1, "optim.weight_decay": 0, "optim.warmup_steps": 0, "optim.grad_clip": 0,
    "optim.accumulate_grad_batches": 1, "trainer.max_steps": 1, "trainer.num_nodes": 1,
    "trainer.save_every_n_steps": 1, "trainer.keep_last_k": 1, "trainer.log_every_n_steps": 1,
    "trainer.val_every_n_steps": 1, "trainer.max_restarts": 0, "namm.hidden": 1, "namm.population": 2,
    "namm.generations": 1, "namm.workers": 0, "namm.cache_weight": 0, "namm.passkey.trials": 1,
}


def _minimum_problems(cfg: Config) -> list[str]:
    problems = []
    for key, low in _MINIMUMS.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value < low:
            problems.append(f"{key}={value!r}: must be >= {low}")
    return problems


def _choice_problems(cfg: Config) -> list[str]:
    from longcpt.data.packing import PACKING_STRATEGIES

    return (
        _choice("data.task", cfg.data.task, TASKS)
        + _choice("data.packing", cfg.data.packing, PACKING_STRATEGIES)
        + _choice("trainer.accelerator", cfg.trainer.accelerator, ("cpu", "gpu", "auto"))
        + _choice("trainer.precision", cfg.trainer.precision, TRAINER_PRECISIONS)
    )


def _other_problems(cfg: Config) -> list[str]:
    """The rules that are not a bound or a choice."""
    optim, devices = cfg.optim, cfg.trainer.devices
    problems = []
    if optim.lr <= 0:
        problems.append(f"optim.lr={optim.lr}: must be > 0 (e.g. 2.0e-5)")
    if optim.gate_lr <= 0:
        problems.append(f"optim.gate_lr={optim.gate_lr}: must be > 0 (e.g. 1.0e-2)")
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
    if cfg.data.pack_examples and cfg.attention.kind == "full":
        problems.append("data.pack_examples=true with attention.kind=full: examples sharing a row would see each "
                        "other; use a document-masking kind (anchor, intra_doc) or remove data.pack_examples")
    if not cfg.trainer.timeout_minutes > 0:
        problems.append(f"trainer.timeout_minutes={cfg.trainer.timeout_minutes!r}: must be > 0 (minutes a collective "
                        "may wait for the slowest rank, e.g. 30; longer than the slowest step or checkpoint save)")
    return problems


def _namm_problems(namm: NammConfig) -> list[str]:
    """The `namm:` section (used by `longcpt namm train`; defaults pass for every other command)."""
    from longcpt.data.fitness import TASKS

    problems = (
        _choice("namm.scorer", namm.scorer, ("bam", "mlp"))
        + _choice("namm.selection", namm.selection, ("reference", "per_head"))
        + _choice("namm.covariance", namm.covariance, ("diagonal", "full"))
    )
    if namm.update_every < 16 or namm.update_every % 16:
        problems.append(f"namm.update_every={namm.update_every}: must be a positive multiple of 16 "
                        "(the spectrogram's hop), e.g. 512")
    if namm.sigma <= 0:
        problems.append(f"namm.sigma={namm.sigma}: must be > 0 (the reference uses 0.065)")
    if not namm.tasks:
        problems.append(f"namm.tasks=[]: name at least one task ({', '.join(TASKS)})")
    for task in namm.tasks:
        problems += _choice("namm.tasks", task, tuple(TASKS))
    if not namm.passkey.lengths or min(namm.passkey.lengths) < 1:
        problems.append(f"namm.passkey.lengths={namm.passkey.lengths}: give prompt lengths in tokens, e.g. [1024]")
    elif "passkey" in namm.tasks and min(namm.passkey.lengths) < namm.update_every:
        short = [n for n in namm.passkey.lengths if n < namm.update_every]
        problems.append(f"namm.passkey.lengths={namm.passkey.lengths}: {short} shorter than namm.update_every="
                        f"{namm.update_every}; such a prompt ends before the first eviction, so no policy can change "
                        "its score (use lengths >= namm.update_every, or a smaller namm.update_every)")
    if not namm.passkey.depths or not all(0 <= d <= 1 for d in namm.passkey.depths):
        problems.append(f"namm.passkey.depths={namm.passkey.depths}: give depths in [0, 1], e.g. [0, 0.5, 1]")
    if namm.init is not None and not Path(namm.init).is_file():
        problems.append(f"namm.init={namm.init!r}: no such policy file (or null to start from the all-zero policy)")
    return problems


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
