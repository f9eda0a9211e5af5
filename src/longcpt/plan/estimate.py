"""`estimate(cfg) -> Plan`: per-device memory and step time of a recipe, and what to change when
it does not fit.

    from longcpt.config import load_config
    from longcpt.plan import estimate
    plan = estimate(load_config("recipes/anchor_llama3_8b_128k.yaml",
                                ["model.pretrained=tests/fixtures/model_configs/Meta-Llama-3-8B"]))
    plan.per_gpu_bytes["total"], plan.fits, plan.suggestion

The memory terms are `longcpt.plan.memory`'s, the FLOPs `longcpt.plan.compute`'s; docs/plan.md
states the model and the measurements that check it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from longcpt.model.recipe import model_args
from longcpt.plan.compute import StepTime, step_time
from longcpt.plan.memory import GIB, Item, Layout, host_bytes, host_items, memory_plan, precision_of
from longcpt.plan.shape import ModelShape

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "other")
DEFAULT_GPU_MEMORY = 80 * GIB
DEFAULT_MFU = 0.4
# Dense peak of an A100 (bf16 tensor cores, TF32 for 32-true), the GPU the AnchorContext runs used.
DEFAULT_PEAK_FLOPS = {"bf16": 312e12, "amp": 312e12, "fp32": 156e12}


@dataclass(frozen=True)
class Change:
    """Overrides (`key=value`) that change a recipe, and the plan's verdict with them."""

    overrides: tuple[str, ...]
    total: int
    fits: bool
    seconds: float
    tokens_per_second: float
    host_per_node: int = 0


@dataclass
class Plan:
    """What one device holds during a training step of a recipe, and how long a step takes.

    Attributes:
        parameters: trained parameters of the model (all of them, but for LoRA: `shape.frozen` more).
        per_gpu_bytes: weights, gradients, optimizer, activations, other and their total.
        fits: total <= gpu_memory, and the host memory per node <= host_memory when that is given.
        items: every term behind `per_gpu_bytes` (category, name, bytes, how it was counted).
        host_items: one rank's host memory terms (`longcpt.plan.memory.host_items`).
        host_per_node: host memory of one node: ranks per node x one rank's peak.
        host_memory: the host memory of one node the verdict compares against (None: not checked).
        peak_at: the moment of the step's peak: "loss", "backward" or "optimizer step".
        moments: bytes by category of what exists only at each of those moments.
        layout: device kind, world size, sequence parallel degree, micro-batch, window.
        precision: fp32 | amp | bf16 (`longcpt.plan.memory`).
        step: FLOPs and time of one optimizer step.
        suggestion: the smallest change that fits when the recipe does not (None otherwise, or when
            nothing tried fits); `tried` lists every change evaluated.
        assumptions: what the plan had to assume about this recipe.
    """

    parameters: int
    per_gpu_bytes: dict[str, int]
    gpu_memory: int
    fits: bool
    items: list[Item]
    peak_at: str
    moments: dict[str, dict[str, int]]
    layout: Layout
    precision: str
    step: StepTime
    shape: ModelShape
    kind: str
    strategy: str
    host_items: list[Item] = field(default_factory=list)
    host_per_node: int = 0
    host_memory: int | None = None
    suggestion: Change | None = None
    tried: list[Change] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `longcpt plan --json` document."""
        step = self.step
        return {
            "parameters": self.parameters,
            "per_gpu_bytes": dict(self.per_gpu_bytes),
            "gpu_memory_bytes": self.gpu_memory,
            "host_bytes_per_node": self.host_per_node,
            "host_memory_bytes": self.host_memory,
            "host_items": [dataclasses.asdict(i) for i in self.host_items],
            "fits": self.fits,
            "peak_at": self.peak_at,
            "moments": self.moments,
            "items": [dataclasses.asdict(i) for i in self.items],
            "layout": {**dataclasses.asdict(self.layout), "tokens_per_device": self.layout.tokens,
                       "data_parallel": self.layout.world // self.layout.sequence_parallel},
            "precision": self.precision,
            "attention": self.kind,
            "strategy": self.strategy,
            "model": _shape_json(self.shape),
            "step": {
                "tokens": step.tokens,
                "model_flops": step.model_flops,
                "recompute_flops": step.recompute_flops,
                "seconds": step.seconds,
                "tokens_per_second": step.tokens_per_second,
                "peak_flops_per_device": step.peak_flops,
                "mfu": step.mfu,
                "hfu": step.hfu,
                "attention_pairs_per_window": step.pairs.pairs,
                "attention_pairs_source": step.pairs.source,
            },
            "suggestion": None if self.suggestion is None else _change_json(self.suggestion),
            "tried": [_change_json(c) for c in self.tried],
            "assumptions": list(self.assumptions),
        }


def _shape_json(shape: ModelShape) -> dict[str, Any]:
    """The model's counts (without the per-tensor sizes), LoRA's sets as sorted lists."""
    out = {k: v for k, v in dataclasses.asdict(shape).items() if k not in ("parameter_sizes", "frozen_sizes")}
    if shape.lora is not None:
        out["lora"] = {**out["lora"], "adapted": sorted(shape.lora.adapted), "trained": sorted(shape.lora.trained)}
    return out


def _change_json(change: Change) -> dict[str, Any]:
    return {"overrides": list(change.overrides), "total_bytes": change.total, "fits": change.fits,
            "host_bytes_per_node": change.host_per_node, "step_seconds": change.seconds,
            "tokens_per_second": change.tokens_per_second}


def estimate(
    cfg,
    *,
    gpu_memory: int | None = DEFAULT_GPU_MEMORY,
    host_memory: int | None = None,
    peak_flops: float | None = None,
    mfu: float = DEFAULT_MFU,
    suggest: bool = True,
    _shape: ModelShape | None = None,
) -> Plan:
    """Plan a validated recipe (`longcpt.config.load_config`) without building or loading the model.

    Args:
        cfg: the recipe, as `longcpt train` would run it.
        gpu_memory: bytes of memory per device the verdict compares against (None: 80 GiB).
        host_memory: bytes of host memory per node the verdict compares against (None: not
            checked; the plan still states what the recipe needs, offload above all).
        peak_flops: dense peak FLOP/s of one device (default: an A100's for the precision).
        mfu: assumed model FLOPs utilisation of a step (model FLOPs only: `longcpt.plan.compute`).
        suggest: when it does not fit, try changes and name the smallest that fits.

    Raises:
        ConfigError: the recipe has problems (as `longcpt train` reports them).
        LongcptError: the model's shape cannot be read (see `longcpt.model.recipe.model_args`).
    """
    from longcpt.config import validate

    validate(cfg)  # a recipe built in Python gets the checks `load_config` runs (and its options resolved)
    gpu_memory = DEFAULT_GPU_MEMORY if gpu_memory is None else gpu_memory
    shape = _shape or ModelShape.from_args(model_args(cfg), cfg.model.lora)
    layout, assumptions = _layout(cfg)
    prec = precision_of(cfg)
    memory = memory_plan(cfg, shape, prec, layout)
    items, peak_at = memory.items, memory.peak
    totals = {c: sum(i.bytes for i in items if i.category == c) for c in CATEGORIES}
    totals["total"] = sum(totals.values())
    if peak_flops is None:
        peak_flops = DEFAULT_PEAK_FLOPS[prec.name]
        if layout.device == "cpu":
            assumptions.append("trainer.accelerator=cpu: the step time uses an A100's peak FLOP/s; pass "
                               "--gpu-tflops with your processor's")
    step = step_time(cfg, shape, layout.world, peak_flops, mfu)
    host = host_items(cfg, shape, prec, layout)
    host_per_node = _ranks_per_node(cfg) * host_bytes(host)
    fits = totals["total"] <= gpu_memory and (host_memory is None or host_per_node <= host_memory)
    plan = Plan(shape.parameters, totals, gpu_memory, fits, items, peak_at, memory.moments,
                layout, prec.name, step, shape, cfg.attention.kind, _strategy_name(cfg), host, host_per_node,
                host_memory, assumptions=assumptions)
    if suggest and not plan.fits:
        plan.suggestion, plan.tried = _smallest_change(cfg, shape, gpu_memory, host_memory, peak_flops, mfu)
    return plan


def _ranks_per_node(cfg) -> int:
    """Processes on one node (`trainer.devices`; `auto` is planned as 1, as `_layout` says)."""
    return cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1


def _strategy_name(cfg) -> str:
    s = cfg.strategy
    if s.name != "deepspeed":
        return s.name
    offload = [name for name, on in (("optimizer", s.offload_optimizer), ("parameters", s.offload_parameters)) if on]
    return f"deepspeed ZeRO-{s.stage}" + (f" (offload {' + '.join(offload)})" if offload else "")


def _layout(cfg) -> tuple[Layout, list[str]]:
    """Devices and tokens per device as the recipe would run, and what had to be assumed."""
    t = cfg.trainer
    assumptions = []
    device = t.accelerator
    if device == "auto":
        device = "gpu"
        assumptions.append("trainer.accelerator=auto planned as a GPU run")
    devices = t.devices
    if devices == "auto":
        devices = 1
        assumptions.append("trainer.devices=auto planned as 1 device per node (pass trainer.devices=N)")
    layout = Layout(device, devices * t.num_nodes, cfg.strategy.sequence_parallel, cfg.data.micro_batch_size,
                    cfg.data.seq_len)
    return layout, assumptions


# ----------------------------------------------------------------------------------------------
# What to change when it does not fit


def _candidates(cfg, world: int) -> list[tuple[str, list[str]]]:
    """(knob, overrides) in the order they cost throughput: cheapest first."""
    s, d = cfg.strategy, cfg.data
    out = []
    if not cfg.trainer.activation_checkpointing:
        out.append(("checkpointing", ["trainer.activation_checkpointing=true"]))
    mb = d.micro_batch_size
    while mb > 1:  # fewer windows per micro-batch, same tokens per optimizer step
        mb //= 2
        acc = cfg.optim.accumulate_grad_batches * d.micro_batch_size // mb
        out.append(("micro-batch", [f"data.micro_batch_size={mb}", f"optim.accumulate_grad_batches={acc}"]))
    n = 2 * s.sequence_parallel
    # N ranks of one node share a window (its all-to-all per layer is not for inter-node links), and
    # accumulate N times more micro-batches to keep the windows per step.
    per_node = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    while n <= min(world, per_node):
        name = [] if s.name in ("ddp", "deepspeed") else ["strategy.name=ddp"]
        acc = cfg.optim.accumulate_grad_batches * n // s.sequence_parallel
        out.append(("sequence parallel", [*name, f"strategy.sequence_parallel={n}", f"optim.accumulate_grad_batches={acc}"]))
        n *= 2
    if s.name != "deepspeed":
        out.append(("zero", ["strategy.name=deepspeed", "strategy.stage=2"]))
        out.append(("zero", ["strategy.name=deepspeed", "strategy.stage=3"]))
    elif s.stage == 2:
        out.append(("zero", ["strategy.stage=3"]))
    ds = [] if s.name == "deepspeed" else ["strategy.name=deepspeed"]
    if not s.offload_optimizer:
        out.append(("offload", [*ds, "strategy.offload_optimizer=true"]))
    if not s.offload_parameters:
        out.append(("offload", [*ds, "strategy.stage=3", "strategy.offload_optimizer=true",
                                "strategy.offload_parameters=true"]))
    return out


def _with(cfg, overrides: list[str]):
    """`cfg` with `overrides` applied and validated, or None when the result is not a valid recipe."""
    from omegaconf import OmegaConf

    from longcpt.config import validate
    from longcpt.errors import LongcptError

    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides))
    new = OmegaConf.to_object(merged)
    try:
        validate(new)
    except LongcptError:
        return None
    return new


def _smallest_change(cfg, shape: ModelShape, gpu_memory: int, host_memory: int | None, peak_flops: float,
                     mfu: float) -> tuple[Change | None, list[Change]]:
    """The first single change that fits (cheapest knob first), else the first pair of knobs."""
    world = _layout(cfg)[0].world
    candidates = _candidates(cfg, world)
    tried: list[Change] = []

    def attempt(overrides: list[str]) -> Change | None:
        new = _with(cfg, overrides)
        if new is None:
            return None
        plan = estimate(new, gpu_memory=gpu_memory, host_memory=host_memory, peak_flops=peak_flops, mfu=mfu,
                        suggest=False, _shape=shape)
        change = Change(tuple(overrides), plan.per_gpu_bytes["total"], plan.fits, plan.step.seconds,
                        plan.step.tokens_per_second, plan.host_per_node)
        tried.append(change)
        return change

    for _, overrides in candidates:
        change = attempt(overrides)
        if change is not None and change.fits:
            return change, tried
    for i, (knob, first) in enumerate(candidates):
        for other, second in candidates[i + 1:]:
            if other == knob:
                continue
            merged = list(dict.fromkeys([*first, *second]))
            change = attempt(merged)
            if change is not None and change.fits:
                return change, tried
    return None, tried
