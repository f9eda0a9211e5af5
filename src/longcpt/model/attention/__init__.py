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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
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


KINDS: dict[str, KindSpec] = {}


def register(
    name: str,
    *,
    options: dict[str, Option] | None = None,
    positions: str = "arange",
    trainable: bool = True,
    inference_memory: bool = False,
    sequence_parallel: bool = False,
    check: Callable[[dict[str, Any]], list[str]] | None = None,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an attention kind to `KINDS` under `name`, with its declarations."""
    if positions not in POSITION_RULES:
        raise ValueError(f"attention kind {name!r}: positions={positions!r} is not one of {POSITION_RULES}")

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        KINDS[name] = KindSpec(
            name, cls, dict(options or {}), positions, trainable, inference_memory, sequence_parallel, check
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
from longcpt.model.attention import document, evict, full, infini, infllm, namm  # noqa: E402,F401
