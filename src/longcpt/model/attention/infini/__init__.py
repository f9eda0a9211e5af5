"""`infini`: Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143), everything it owns in one folder.

    core.py       the attention core: compressive memory, segments, state across calls
    training.py   segment-major training loss; the gate statistics logged while training
    hf_config.py  config.json of an exported Infini model, both directions
    export.py     the modeling files shipped in every export (`remote/`)
    plan.py       the planner's pair, FLOP and activation terms
    doctor.py     `longcpt doctor`'s check of the memory under bf16 autocast

This module registers the kind with its hooks (`longcpt.model.attention.KindHooks`); nothing
outside this folder names it. docs/infini.md tells the longer story.
"""

from __future__ import annotations

from longcpt.model.attention import (
    POSITIVE_NUMBER,
    KindExport,
    KindHooks,
    Option,
    ParamGroup,
    PlanTerms,
    register,
)
from longcpt.model.attention.infini import doctor, export, hf_config, plan, training
from longcpt.model.attention.infini.core import (
    DENOMINATOR_EPS,
    OPTIONS,
    InfiniAttention,
    InfiniMemory,
    feature_map,
    local_attention,
    memory_read,
    memory_write,
    plan_segments,
)

# Training settings: options of the kind in recipes (`attention.gate_lr`) that the model itself
# does not use, so the export leaves them out (`hf_config.py` writes `OPTIONS` only).
TRAINING_OPTIONS = {
    "gate_lr": Option(1.0e-2, POSITIVE_NUMBER, "learning rate of the gates (their own optimizer group, no weight decay)"),
}


def param_groups(options: dict, optim) -> list[ParamGroup]:
    """The gates in their own group, without weight decay, at `attention.gate_lr`: at the common
    learning rate they never move (Hugging Face's nanotron study, "A failed experiment:
    Infini-Attention"; nanotron exp57)."""
    return [ParamGroup("gate", ("gate",), options["gate_lr"], 0.0)]


HOOKS = KindHooks(
    training_loss=training.segment_major_loss,
    param_groups=param_groups,
    own_parameters=("gate",),
    metrics=training.gate_stats,
    progress=training.gate_progress,
    export=KindExport(hf_config.MODEL_TYPE, hf_config.infini_config, hf_config.split_config, export.write_remote_code),
    plan=PlanTerms(pairs=plan.segment_pairs, extra_flops=plan.memory_flops, recomputes=1,
                   layer_bytes=plan.layer_bytes, activations=plan.activations, live_tokens=plan.live_tokens),
    doctor=doctor.checks,
    no_sequence_parallel="its memory is already constant in the window length, so it does not need it",
    reads_any_length=True,
)
# compiles=False: the segment plan is built in Python from the values of cu_seqlens and positions.
register("infini", options={**OPTIONS, **TRAINING_OPTIONS}, positions="document", hooks=HOOKS,
         compiles=False)(InfiniAttention)

__all__ = [
    "DENOMINATOR_EPS",
    "OPTIONS",
    "TRAINING_OPTIONS",
    "InfiniAttention",
    "InfiniMemory",
    "feature_map",
    "local_attention",
    "memory_read",
    "memory_write",
    "plan_segments",
]
