"""AdamW with parameter groups, and the warmup-then-cosine learning-rate schedule.

Groups (names are transformers' parameter names, see `longcpt.model.llama`):

| group    | parameters                                         | lr             | weight decay |
|----------|----------------------------------------------------|----------------|--------------|
| decay    | matrices: projections, embeddings, LM head         | `optim.lr`     | `optim.weight_decay` |
| no_decay | vectors: RMSNorm weights, biases                   | `optim.lr`     | 0 |
| (kind's) | what the attention kind's `param_groups` hook asks | its own        | its own |

Decaying norm gains and biases only pulls them to zero for no regularisation benefit (nanoGPT and
litgpt exclude every parameter with fewer than two dimensions). A kind with parameters of its own
may give them their own group (Infini-attention's gates need a larger learning rate or they never
move: `longcpt.model.attention.infini`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from longcpt.config import OptimConfig


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Split trainable parameters into the decay / no_decay groups and the attention kind's own.

    Args:
        model: the model (a `CausalLM`).
        optim: the recipe's `optim` section.

    Returns:
        Non-empty groups for `torch.optim.AdamW`, each with `name`, `params`, `param_names`, `lr`
        and `weight_decay`.
    """
    from longcpt.model.attention import kind_spec

    args = model.args
    hook = kind_spec(args.attention).hooks.param_groups
    own = hook(args.attention_options, optim) if hook is not None else []
    settings = {"decay": (optim.lr, optim.weight_decay), "no_decay": (optim.lr, 0.0)}
    settings.update({g.name: (g.lr, g.weight_decay) for g in own})
    named: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in settings}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = next((g.name for g in own if any(name.endswith(f".self_attn.core.{x}") for x in g.parameters)), None)
        if group is None:  # a ZeRO-3 partition is flat: ds_shape is the full shape
            group = "no_decay" if len(getattr(p, "ds_shape", p.shape)) < 2 else "decay"
        named[group].append((name, p))
    groups = []
    for group, members in named.items():
        if members:
            lr, wd = settings[group]
            groups.append({
                "name": group,
                "params": [p for _, p in members],
                "param_names": [n for n, _ in members],
                "lr": lr,
                "weight_decay": wd,
            })
    return groups


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warmup from 1/warmup to 1 over `warmup_steps` steps, then a cosine from 1 down to
    `min_lr_ratio` at `max_steps`, constant after:

        1.0 |      ______
            |    /        `-.
            |  /              `-._
      ratio |/                     `----
            0   warmup           max_steps
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, optim: OptimConfig, max_steps: int, offload: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` plus a per-step `LambdaLR` following `lr_factor`.

    Args:
        model: the model.
        optim: the recipe's `optim` section.
        max_steps: optimizer steps of the run (the cosine reaches its floor there).
        offload: DeepSpeed optimizer offload: use DeepSpeed's CPU Adam (the vectorised C++ AdamW
            that ZeRO-Offload expects) instead of torch's.

    Returns:
        (optimizer, scheduler); the scheduler must be stepped once per optimizer step.
    """
    groups = param_groups(model, optim)
    for g in groups:
        del g["param_names"]
    betas = (float(optim.betas[0]), float(optim.betas[1]))
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=optim.lr, betas=betas, eps=optim.eps, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps)

    def factor(step: int) -> float:
        return lr_factor(step, optim.warmup_steps, max_steps, optim.min_lr_ratio)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
