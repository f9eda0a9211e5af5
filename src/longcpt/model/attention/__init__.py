"""Attention kinds behind one interface, picked by `attention.kind`.

Every kind is an `nn.Module` built as `cls(args, layer_idx)` whose forward takes the *un-rotated*
projections and the per-forward `AttentionContext`, and returns the attention output:

    core(q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, D), ctx) -> (B, Hq, T, D)

Rotation happens inside the core (through `ctx.rotate`), so a kind may use q/k before RoPE
(Infini-attention's memory does) or with its own positions.

A kind declares everything the rest of longcpt needs to know about it once, when it registers:

    @register("infini", options={"segment_len": Option(2048, POSITIVE_INT, "tokens per segment"), ...},
              positions="document", check=infini_option_problems)
    class InfiniAttention(nn.Module): ...

* `options`: its option names, defaults and constraints. Recipes (`attention.<name>`), the Python
  API (`from_pretrained(..., <name>=...)`) and `--attention-options` all use these names, and
  `resolve_options` is the only place that fills defaults and checks values. The model receives
  the resolved dict as `args.attention_options`.
* `positions`: the position rule of its packed batches (`longcpt.batch.POSITION_RULES`).
* `trainable`: whether `longcpt train` may use it (inference-time memories are not).
* `inference_memory`: it replaces softmax attention over a KV cache at inference (InfLLM, NAMM,
  evictions), so it applies to any softmax model but not to an Infini model.
* `sequence_parallel`: it can run under `strategy.sequence_parallel`: the core is called on the
  whole window for a subset of heads (`ulysses.py` does the all-to-all around it), so a kind
  qualifies when its heads are independent and it needs no state across calls.
* `compiles`: `torch.compile` can trace its core without graph breaks (`longcpt.model.compile`);
  a core that plans its work in Python from the values of `cu_seqlens` declares False and runs
  eagerly inside its compiled block.

Everything else the rest of longcpt does differently for a kind, the kind says through optional
hooks (`KindHooks`), so that plan, doctor, export, the optimizer and the callbacks ask the
registry and never name a kind:

* `training_loss`: a whole-model loss replacing the layer-by-layer one (Infini trains segment by
  segment);
* `param_groups`: optimizer groups for the kind's own parameters (Infini's gates at their own
  learning rate); `own_parameters`: those parameters' names under the attention core, which a
  checkpoint of this kind carries and another kind leaves out;
* `metrics` and `progress`: what `longcpt train` logs and prints for the kind;
* `inference_kind`: the kind a model trained with this one runs as for generation and export
  (`anchor` and `intra_doc` models run as `full`);
* `export`: how a model of this kind is written as a Hugging Face folder when transformers has no
  class for it (its own `model_type`, config fields and modeling files), and read back;
* `plan`: the planner's attention-pair, FLOP and activation terms (`PlanTerms`);
* `doctor`: the checks `longcpt doctor` runs for the kind;
* `telemetry`: what its inference state reports (`kept_fraction`, `cache_use`, `visible_share`,
  `attention_on`; `longcpt.model.generation` reads them).

A kind that needs several files keeps them in one folder (`infini/`); docs/extending.md lists
what a new kind touches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from longcpt.batch import POSITION_RULES
from longcpt.errors import LongcptError
from longcpt.model.rope import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:
    from longcpt.model.attention.ulysses import SequenceParallel

# ----------------------------------------------------------------------------------------------
# Option declarations: a default, a constraint (predicate + its wording) and a line of help.


@dataclass(frozen=True)
class Constraint:
    """A predicate on an option value and the words that state it ("a positive integer")."""

    valid: Callable[[Any], bool]
    words: str


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


POSITIVE_INT = Constraint(lambda x: _is_int(x) and x > 0, "a positive integer")
NON_NEGATIVE_INT = Constraint(lambda x: _is_int(x) and x >= 0, "an integer >= 0")
FINITE_NUMBER = Constraint(
    lambda x: isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x), "a finite number"
)
POSITIVE_NUMBER = Constraint(lambda x: FINITE_NUMBER.valid(x) and x > 0, "a number > 0")


def one_of(*values: Any) -> Constraint:
    return Constraint(lambda x: x in values, f"one of {', '.join(map(str, values))}")


def optional(inner: Constraint) -> Constraint:
    return Constraint(lambda x: x is None or inner.valid(x), f"null or {inner.words}")


@dataclass(frozen=True)
class Option:
    """One option of an attention kind."""

    default: Any
    constraint: Constraint
    help: str = ""


@dataclass(frozen=True)
class ParamGroup:
    """An optimizer group of a kind's own parameters (`longcpt.lit.optim` puts every other parameter
    in its decay / no_decay groups).

    Attributes:
        name: the group's name (logged as `train/lr_<name>`).
        parameters: names under the attention core (`...self_attn.core.<name>`) that belong to it.
        lr: its learning rate.
        weight_decay: its weight decay.
    """

    name: str
    parameters: tuple[str, ...]
    lr: float
    weight_decay: float = 0.0


@dataclass(frozen=True)
class KindExport:
    """How a kind that transformers has no class for is written as a Hugging Face folder, and read back.

    Attributes:
        model_type: the `model_type` its config.json carries (how a folder is recognised).
        write_config: (the source family's config dict, `ModelArgs`) -> the folder's config dict.
        read_config: (config dict, file name for errors) -> (the source family's config for
            `ModelArgs.from_hf_config`, the kind's options by name).
        write_files: copies the modeling files into the folder being written.
    """

    model_type: str
    write_config: Callable[[dict[str, Any], Any], dict[str, Any]]
    read_config: Callable[[dict[str, Any], str], tuple[dict[str, Any], dict[str, Any]]]
    write_files: Callable[[Path], None]


@dataclass(frozen=True)
class PlanTerms:
    """What `longcpt plan` adds for a kind to the cost of a decoder (`longcpt.plan`).

    Attributes:
        pairs: (document piece lengths of one window, options) -> the (query, key) pairs attended
            (for a kind that attends across documents, the planner passes the whole window as one).
        extra_flops: (model shape, options) -> forward FLOPs per token and layer beyond the
            projections and the attention pairs (e.g. a memory read and write).
        recomputes: forwards the kind's training recomputes on its own (a checkpoint per segment).
        layer_bytes: (model shape, activation bytes per element, device "cpu" | "gpu", options) ->
            extra bytes a block keeps per token for the backward.
        activations: (items, context) -> the activation items of the plan with the kind's own terms;
            `context` has cfg, shape, precision, layout, the live tokens and an `item(...)` factory.
        live_tokens: (tokens a device holds, micro-batch size, options) -> (tokens whose activations
            are alive at once, a note), for kinds whose training holds only a part of the window.
    """

    pairs: Callable[[Sequence[int], dict[str, Any]], float]
    extra_flops: Callable[[Any, dict[str, Any]], float] | None = None
    recomputes: int = 0
    layer_bytes: Callable[[Any, int, str, dict[str, Any]], int] | None = None
    activations: Callable[[list, Any], list] | None = None
    live_tokens: Callable[[int, int, dict[str, Any]], tuple[int, str]] | None = None


def causal_pairs(pieces: Sequence[int], options: dict[str, Any]) -> float:
    """Pairs of causal attention inside each document piece: sum of l (l + 1) / 2."""
    return sum(n * (n + 1) / 2 for n in pieces)


def window_pairs(pieces: Sequence[int], options: dict[str, Any]) -> float:
    """Pairs of causal attention over the whole window, whatever its documents: T (T + 1) / 2."""
    t = sum(pieces)
    return t * (t + 1) / 2


@dataclass(frozen=True)
class KindHooks:
    """The optional behaviour of a kind (see the module docstring); None = the common behaviour.

    Attributes:
        training_loss: loss(model, input_ids, labels, position_ids, cu_seqlens, reduction, chunk_size).
        param_groups: (resolved options, the recipe's `optim` section) -> `ParamGroup`s.
        own_parameters: names under the attention core of the parameters the kind adds.
        metrics: model -> {name: value} logged under `train/` every step.
        progress: the logged metrics -> text appended to `longcpt train`'s step line.
        inference_kind: the kind the model runs as for generation and export.
        export: `KindExport`, for kinds transformers has no class for.
        plan: `PlanTerms`; every trainable kind has them.
        doctor: (device, quick, tools) -> results: the checks `longcpt doctor` runs for the kind;
            `tools` (`longcpt.doctor.kernels.KindCheckTools`) gives the shared pieces (a tiny model,
            packed batches, the float64 reference comparison, the result rows). Every trainable
            kind has them.
        across_documents: it attends across the documents of a packed row (`full`): examples
            packed into one row would see each other, and the planner reads no document lengths.
        telemetry: what the kind's inference state reports (`kept_fraction`, `cache_use`,
            `visible_share`, `attention_on`).
        no_sequence_parallel: why `strategy.sequence_parallel` does not apply, for the error.
        reads_any_length: its inference state stays bounded however long the input (Infini's
            compressive memory); kinds with `inference_memory` do so too (`reads_any_length`).
    """

    training_loss: Callable[..., Any] | None = None
    param_groups: Callable[[dict[str, Any], Any], list[ParamGroup]] | None = None
    own_parameters: tuple[str, ...] = ()
    metrics: Callable[[nn.Module], dict[str, float]] | None = None
    progress: Callable[[dict[str, float]], str] | None = None
    inference_kind: str | None = None
    export: KindExport | None = None
    plan: PlanTerms | None = None
    doctor: Callable[..., Any] | None = None
    across_documents: bool = False
    telemetry: tuple[str, ...] = ()
    no_sequence_parallel: str = ""
    reads_any_length: bool = False


def reads_any_length(kind: str) -> bool:
    """Does `kind` read an input of any length with bounded state (an inference-time memory,
    Infini's compressive memory), so that an evaluation need not cut inputs to the model's window?"""
    spec = kind_spec(kind)
    return spec.inference_memory or spec.hooks.reads_any_length


TELEMETRY = ("kept_fraction", "cache_use", "visible_share", "attention_on")


@dataclass(frozen=True)
class KindSpec:
    """What an attention kind declares when it registers (see the module docstring)."""

    name: str
    cls: type[nn.Module]
    options: dict[str, Option] = field(default_factory=dict)
    positions: str = "arange"
    trainable: bool = True
    inference_memory: bool = False
    sequence_parallel: bool = False
    check: Callable[[dict[str, Any]], list[str]] | None = None  # problems across options
    hooks: KindHooks = field(default_factory=KindHooks)
    compiles: bool = True

    def own_parameter(self, name: str) -> bool:
        """Is `name` (a model parameter name) one of the parameters this kind adds?"""
        return any(name.endswith(f".self_attn.core.{p}") for p in self.hooks.own_parameters)


KINDS: dict[str, KindSpec] = {}
# The kind a plain softmax checkpoint (any Hugging Face Llama-family folder) runs as.
DEFAULT_KIND = "full"


def register(
    name: str,
    *,
    options: dict[str, Option] | None = None,
    positions: str = "arange",
    trainable: bool = True,
    inference_memory: bool = False,
    sequence_parallel: bool = False,
    check: Callable[[dict[str, Any]], list[str]] | None = None,
    hooks: KindHooks | None = None,
    compiles: bool = True,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an attention kind to `KINDS` under `name`, with its declarations.

    Raises:
        ValueError: an unknown position rule or telemetry name, or a name registered twice.
    """
    if positions not in POSITION_RULES:
        raise ValueError(f"attention kind {name!r}: positions={positions!r} is not one of {POSITION_RULES}")
    hooks = hooks or KindHooks()
    unknown = [t for t in hooks.telemetry if t not in TELEMETRY]
    if unknown:
        raise ValueError(f"attention kind {name!r}: telemetry {unknown} is not one of {TELEMETRY}")

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in KINDS and KINDS[name].cls is not cls:
            raise ValueError(f"attention kind {name!r} is registered twice ({KINDS[name].cls} and {cls})")
        KINDS[name] = KindSpec(
            name, cls, dict(options or {}), positions, trainable, inference_memory, sequence_parallel, check, hooks,
            compiles,
        )
        return cls

    return add


def kind_spec(kind: str, where: str = "attention kind") -> KindSpec:
    """The registered `KindSpec` of `kind`.

    Raises:
        LongcptError: an unknown kind, naming the known ones.
    """
    if kind not in KINDS:
        raise LongcptError(f"{where} {kind!r} is unknown; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[kind]


def option_problems(kind: str, options: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """`kind`'s defaults overridden by `options`, and every problem found in them.

    Args:
        kind: a registered kind.
        options: option values by name (a recipe's `attention.*`, `--attention-options`, or the
            keyword arguments of `from_pretrained`).
        prefix: how a problem names an option, e.g. "attention." for recipes.

    Returns:
        (resolved options, problems); each problem names the option, its value and what it must be.
    """
    spec = kind_spec(kind)
    problems = []
    for key in options:
        if key not in spec.options:
            valid = ", ".join(spec.options) or "none"
            problems.append(f"{prefix}{key}: not an option of attention kind {kind!r} (its options: {valid})")
    resolved = {key: options.get(key, opt.default) for key, opt in spec.options.items()}
    for key, opt in spec.options.items():
        if not opt.constraint.valid(resolved[key]):
            problems.append(f"{prefix}{key}={resolved[key]!r}: must be {opt.constraint.words} (kind {kind!r})")
    if not problems and spec.check is not None:
        problems += [f"{prefix.rstrip('.') or 'options'}: {p}" for p in spec.check(resolved)]
    return resolved, problems


def resolve_options(kind: str, options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`option_problems` that raises one `LongcptError` listing every problem."""
    resolved, problems = option_problems(kind, options, prefix)
    if problems:
        raise LongcptError(f"attention kind {kind!r}: " + "; ".join(problems))
    return resolved


def inference_kind(kind: str) -> str:
    """The kind a model trained with `kind` runs as for generation and export (itself by default).

    Raises:
        LongcptError: an unknown kind.
    """
    return kind_spec(kind).hooks.inference_kind or kind


def exported_kind(hf_config: dict[str, Any]) -> KindSpec | None:
    """The kind whose own Hugging Face export `hf_config` is (by its `model_type`), or None for a
    folder transformers loads itself (a plain softmax model)."""
    for spec in KINDS.values():
        if spec.hooks.export is not None and spec.hooks.export.model_type == hf_config.get("model_type"):
            return spec
    return None


def switch_problem(stored: str, requested: str) -> str | None:
    """Why a model trained as `stored` cannot run as `requested`, or None when it can.

    Inference-time memories replace softmax attention over a KV cache, so they apply to models
    that run as `DEFAULT_KIND`, not to a kind whose attention is its own (Infini's memory).
    """
    if kind_spec(requested).inference_memory and inference_kind(stored) != DEFAULT_KIND:
        return (f"attention={requested!r} replaces softmax attention over a KV cache, but this is an {stored!r} "
                f"model, whose attention is its own (use it as {stored!r})")
    return None


def build_attention(args, layer_idx: int) -> nn.Module:
    """The attention core of layer `layer_idx` for `args.attention`."""
    return kind_spec(args.attention).cls(args, layer_idx)


@dataclass
class AttentionContext:
    """What every layer's attention needs for one forward call.

    Attributes:
        position_ids: (B, T) integer positions used for RoPE.
        cu_seqlens: (N+1,) int32 document starts over the flattened B*T tokens, or None.
        cos, sin: (B, T, D) float32 tables for `position_ids`.
        rope: the model's rotary module (for kinds that need other positions).
        cache: scratch shared by the layers of this call (e.g. a document grouping computed once).
        state: recurrent state carried across calls (KV cache, Infini memory), keyed by layer index.
        sequence_parallel: the group sharing this window under sequence parallelism, or None.
            The layers then hold T/N tokens each, while `position_ids`, `cu_seqlens`, `cos`
            and `sin` describe the whole window, as the core sees it (`ulysses.py`).
    """

    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    rope: RotaryEmbedding
    cache: dict[str, Any] = field(default_factory=dict)
    state: dict[Any, Any] | None = None
    sequence_parallel: SequenceParallel | None = None

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply RoPE at `position_ids` with the model's rope precision."""
        return apply_rotary(q, k, self.cos, self.sin, self.rope.precision)


# Register the built-in kinds.
from longcpt.model.attention import document, evict, full, infini, infllm, namm, s2  # noqa: E402,F401
