"""`s2`: LongLoRA's shifted sparse attention (S²-Attn, arXiv 2309.12307), a training-only kind.

    core.py    the attention core: groups of `group_size` tokens per document, half of the heads
               shifted by half a group, through the document kinds' kernels
    plan.py    the planner's pair and activation terms
    doctor.py  `longcpt doctor`'s checks: the groups against a dense reference, a tiny model

This module registers the kind with its hooks (`longcpt.model.attention.KindHooks`). A model
trained with `s2` generates, evaluates and exports as `full` (`inference_kind`), as LongLoRA's
models do; docs/lora.md tells the longer story.
"""

from __future__ import annotations

from longcpt.model.attention import DEFAULT_KIND, KindHooks, PlanTerms, register
from longcpt.model.attention.s2 import doctor, plan
from longcpt.model.attention.s2.core import OPTIONS, S2Attention, group_bounds, option_problems

HOOKS = KindHooks(inference_kind=DEFAULT_KIND, plan=PlanTerms(pairs=plan.pairs, layer_bytes=plan.layer_bytes),
                  doctor=doctor.checks)
# compiles=False: the groups are laid out in Python from the values of cu_seqlens.
register("s2", options=OPTIONS, positions="document", sequence_parallel=True, check=option_problems,
         hooks=HOOKS, compiles=False)(S2Attention)

__all__ = ["OPTIONS", "S2Attention", "group_bounds"]
