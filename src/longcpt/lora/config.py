"""The `model.lora` section of a recipe (`longcpt.lora`); `LoraConfig.problems()` is its validation.

Light on purpose: `longcpt.config` imports it, and a recipe is read before torch is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Modules whose forward is not a plain projection: the LM head returns the fused loss in training.
_NOT_TARGETS = ("lm_head",)


@dataclass
class LoraConfig:
    """The `model.lora` section (see `longcpt.lora`); `problems()` is its validation."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable: list[str] = field(default_factory=list)

    def problems(self, prefix: str = "model.lora.") -> list[str]:
        """Every problem of the section, each naming the key, the value and the fix."""
        problems = []
        if not (isinstance(self.r, int) and self.r >= 1):
            problems.append(f"{prefix}r={self.r!r}: must be an integer >= 1 (the adapter rank, e.g. 8)")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"{prefix}alpha={self.alpha!r}: must be > 0 (the adapters are scaled by alpha / r; "
                            "LongLoRA uses 16 with r 8)")
        if not 0 <= self.dropout < 1:
            problems.append(f"{prefix}dropout={self.dropout!r}: must be in [0, 1)")
        if not self.targets:
            problems.append(f"{prefix}targets=[]: name the linear layers that get adapters, e.g. "
                            "[q_proj, k_proj, v_proj, o_proj]")
        for name in self.targets:
            if name.split(".")[-1] in _NOT_TARGETS:
                problems.append(f"{prefix}targets: {name!r} computes the fused loss in training, so it cannot "
                                f"take an adapter; train it in full with {prefix}trainable: [{name}]")
        both = sorted(set(self.targets) & set(self.trainable))
        if both:
            problems.append(f"{prefix}targets and {prefix}trainable both name {both}: a module gets adapters or "
                            "is trained in full, not both")
        return problems

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
