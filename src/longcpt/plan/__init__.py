"""Capacity planning: per-device memory and step time of a recipe before any GPU is rented.

    from longcpt.config import load_config
    from longcpt.plan import estimate
    plan = estimate(load_config("recipes/anchor_llama2_7b_64k.yaml", ["model.pretrained=PATH"]))
    plan.per_gpu_bytes    # {"weights", "gradients", "optimizer", "activations", "other", "total"}
    plan.fits, plan.suggestion, plan.step.seconds

`longcpt plan RECIPE [key=value ...] [--gpu-memory 80GiB] [--json]` prints the same. Modules:
`shape` (the model as counts), `memory` (the memory terms), `compute` (FLOPs and step time),
`estimate` (the plan and the smallest change that fits), `report` (table, JSON, command line).
"""

from longcpt.plan.estimate import Change, Plan, estimate
from longcpt.plan.report import format_plan, parse_size

__all__ = ["Change", "Plan", "estimate", "format_plan", "parse_size"]
