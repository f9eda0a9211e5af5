"""`toy`: a trainable attention kind with one parameter per layer, written as a newcomer would.

Causal attention over the row (a KV cache when streaming, as `full` does) whose output is scaled by
a learned `scale`, trained in its own optimizer group at `attention.scale_lr`, logged as
`train/scale/mean`, exported with its own model type, planned and checked by the doctor. This folder
and the `register` call at its end are all it takes (tests/model/test_kind_conformance.py and
tests/lit/test_toy_kind.py import it; docs/extending.md walks through it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from longcpt.model.attention import (
    KINDS,
    POSITIVE_NUMBER,
    KindExport,
    KindHooks,
    Option,
    ParamGroup,
    PlanTerms,
    register,
    window_pairs,
)

MODEL_TYPE = "longcpt_toy"


class ToyAttention(nn.Module):
    """`full` attention (`ctx.state` carries its KV cache) times a learned scalar."""

    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.inner = KINDS["full"].cls(args, layer_idx)  # no parameters of its own
        self.scale = nn.Parameter(torch.ones(()))

    def reset_parameters(self) -> None:
        """For checkpoints that have no `scale` (a plain model continued as `toy`)."""
        with torch.no_grad():
            self.scale.fill_(1.0)

    def forward(self, q, k, v, ctx):
        return self.scale * self.inner(q, k, v, ctx)


def param_groups(options: dict, optim) -> list[ParamGroup]:
    return [ParamGroup("scale", ("scale",), options["scale_lr"], 0.0)]


def metrics(model) -> dict[str, float]:
    scales = [m.scale.detach().float() for m in model.modules() if isinstance(m, ToyAttention)]
    return {"scale/mean": float(torch.stack(scales).mean())} if scales else {}


def doctor(tools) -> list:
    return [(tools.KERNELS, "toy", lambda: tools.model_check("toy", [{}], name=lambda options: "toy sdpa"))]


def write_config(base: dict, args) -> dict:
    """config.json of a toy model: the source family's, under the toy's model type."""
    return {**base, "model_type": MODEL_TYPE, "toy_base_model_type": base["model_type"]}


def read_config(config: dict, source: str) -> tuple[dict, dict]:
    base = {k: v for k, v in config.items() if k != "toy_base_model_type"}
    return {**base, "model_type": config["toy_base_model_type"]}, {}


def write_files(folder: Path) -> None:
    """No modeling code: transformers cannot run the scale; longcpt reads the folder back as `toy`."""


HOOKS = KindHooks(
    param_groups=param_groups,
    own_parameters=("scale",),
    metrics=metrics,
    export=KindExport(MODEL_TYPE, write_config, read_config, write_files),
    plan=PlanTerms(pairs=window_pairs),
    doctor=doctor,
    across_documents=True,
)
register("toy", options={"scale_lr": Option(0.05, POSITIVE_NUMBER, "learning rate of the scales")},
         positions="arange", hooks=HOOKS)(ToyAttention)
