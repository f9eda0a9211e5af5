"""`longcpt plan RECIPE [key=value ...] [--gpu-memory 80GiB] [--json]`: the plan as a table or JSON.

The recipe is loaded and validated by `longcpt.config.load_config`, as `longcpt train` does, so a
recipe with problems gets the same messages (data and model paths need not exist: a cluster
recipe can be planned on a laptop; the model's shape is read from `model.pretrained`'s
config.json or `model.config`).
"""

from __future__ import annotations

import json
import re

from longcpt.errors import LongcptError
from longcpt.plan.estimate import CATEGORIES, Plan, estimate

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes of a size such as `80GiB`, `40GB`, `24576MiB` (units B, KB..TB = 1000^k, KiB..TiB = 1024^k).

    Raises:
        ValueError: not a positive number followed by one of those units, with what was expected.
    """
    expected = "a size such as 80GiB, 40GB or 24576MiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not {expected}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        if not unit:
            raise ValueError(f"{text!r} has no unit; write e.g. {match.group(1)}GiB ({expected})")
        hint = f"; did you mean {match.group(1)}{unit[0].upper()}iB?" if unit[0] in "kmgt" else ""
        raise ValueError(f"{text!r}: unknown unit {match.group(2)!r}{hint} (expected {expected})")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r}: must be more than 0 bytes")
    return size


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def format_plan(plan: Plan, title: str = "") -> str:
    """The readable table `longcpt plan` prints."""
    s, lay, step = plan.shape, plan.layout, plan.step
    lines = [f"longcpt plan{': ' + title if title else ''}"]
    lines.append(f"model      {s.layers} layers, {s.hidden} wide, {s.heads}/{s.kv_heads} heads x {s.head_dim}, "
                 f"MLP {s.intermediate}, vocab {s.vocab:,}: {s.weights:,} parameters"
                 + (f", {plan.parameters:,} trained (LoRA r={s.lora.rank}; {s.frozen:,} frozen)" if s.lora else ""))
    dp = lay.world // lay.sequence_parallel
    sp = f", sequence parallel {lay.sequence_parallel} (data parallel {dp})" if lay.sequence_parallel > 1 else ""
    lines.append(f"run        {lay.world} {lay.device.upper()}{'s' if lay.world > 1 else ''}, {plan.strategy}{sp}, "
                 f"{plan.precision}, attention {plan.kind}, {lay.micro_batch} x {lay.seq_len:,} tokens per micro-batch "
                 f"({lay.tokens:,} per device)")
    lines.append("")
    width = max(len(i.name) for i in plan.items) + 2
    lines.append(f"{'per device':<12}{'':<{width}}{'GiB':>8}   how")
    for category in CATEGORIES:
        rows = [i for i in plan.items if i.category == category]
        if not rows:
            continue
        lines.append(f"{category:<12}{'':<{width}}{gib(plan.per_gpu_bytes[category]):>8}")
        for item in rows:
            lines.append(f"{'':<12}{item.name:<{width}}{gib(item.bytes):>8}   {item.note}")
    verdict = "fits" if plan.fits else "does NOT fit"
    margin = plan.gpu_memory - plan.per_gpu_bytes["total"]
    lines.append(f"{'total':<12}{'':<{width}}{gib(plan.per_gpu_bytes['total']):>8}   of {gib(plan.gpu_memory)} GiB: "
                 f"{verdict} ({'margin' if margin >= 0 else 'short by'} {gib(abs(margin))} GiB); "
                 f"peak at the {plan.peak_at}")
    lines.append(_host_line(plan))
    lines.append("")
    recompute = f" + {step.recompute_flops:.3g} recomputed" if step.recompute_flops else ""
    lines.append(f"step       {step.tokens:,} tokens: {step.model_flops:.3g} model FLOPs{recompute}; "
                 f"{step.seconds:.3g} s at {step.mfu:.0%} MFU{f' ({step.hfu:.0%} HFU)' if step.recompute_flops else ''} "
                 f"of {step.peak_flops / 1e12:.0f} TFLOP/s per device ({step.tokens_per_second:,.0f} tokens/s)")
    lines.append(f"attention  {step.pairs.pairs:.4g} (query, key) pairs per window: {step.pairs.source}")
    if not plan.fits:
        if plan.suggestion is not None:
            c = plan.suggestion
            host = f", host {gib(c.host_per_node)} GiB per node" if any("offload" in o for o in c.overrides) else ""
            lines.append(f"change     smallest change that fits: {' '.join(c.overrides)} "
                         f"({gib(c.total)} GiB{host}, {c.tokens_per_second:,.0f} tokens/s)")
        else:
            lines.append(f"change     nothing tried fits ({len(plan.tried)} changes of checkpointing, micro-batch, "
                         "sequence parallelism, ZeRO stage and offload): use more devices or a shorter data.seq_len")
    for note in plan.assumptions:
        lines.append(f"assumed    {note}")
    return "\n".join(lines)


def _host_line(plan: Plan) -> str:
    """Host memory per node: ranks per node x the larger of a rank's offloaded states and its loading copy."""
    offloaded = sum(i.bytes for i in plan.host_items if i.persistent)
    loading = sum(i.bytes for i in plan.host_items if "load" in i.when)
    per_rank = max(offloaded, loading)
    verdict = "" if plan.host_memory is None else (
        f" of {gib(plan.host_memory)} GiB: {'fits' if plan.host_per_node <= plan.host_memory else 'does NOT fit'}")
    if not per_rank:
        return f"{'host':<12}0 GiB per node{verdict} (nothing offloaded, no rank loads the whole model)"
    what = [f"{gib(offloaded)} GiB offloaded (pinned)"] if offloaded else []
    what += [f"{gib(loading)} GiB whole model while loading"] if loading else []
    return (f"{'host':<12}{gib(plan.host_per_node)} GiB per node{verdict}: {plan.host_per_node // per_rank} ranks x "
            f"{gib(per_rank)} GiB ({'; '.join(what)}); Python, CUDA and data loaders not counted")


def run(args) -> int:
    """Entry point of `longcpt plan` (see `longcpt.cli`).

    With `--json`, a plan that cannot be made (a bad recipe, a model folder without config.json)
    still prints one JSON document, `{"recipe", "overrides", "error", "problems"}`, before the
    error goes to stderr and the command exits with status 2.
    """
    head = {"recipe": args.recipe, "overrides": list(args.overrides)}
    try:
        plan = _plan(args)
    except LongcptError as e:
        if args.json:
            problems = getattr(e, "problems", [str(e)])
            print(json.dumps({**head, "error": str(e), "problems": problems}, indent=2))
        raise
    if args.json:
        print(json.dumps({**head, **plan.to_json()}, indent=2))
    else:
        print(format_plan(plan, " ".join([args.recipe, *args.overrides])))
    return 0


def _plan(args) -> Plan:
    from longcpt.config import load_config

    sizes = {}
    for flag in ("gpu_memory", "host_memory"):
        text = getattr(args, flag)
        try:
            sizes[flag] = None if text is None else parse_size(text)
        except ValueError as e:
            raise LongcptError(f"--{flag.replace('_', '-')} {e}") from None
    cfg = load_config(args.recipe, args.overrides)
    return estimate(cfg, gpu_memory=sizes["gpu_memory"], host_memory=sizes["host_memory"],
                    peak_flops=args.gpu_tflops * 1e12 if args.gpu_tflops else None, mfu=args.mfu)
