"""The `namm:` section of a recipe: what `longcpt namm train` evolves, and how.

`longcpt namm train` loads its recipe with `NammRecipe`, the training schema (`longcpt.config.Config`)
plus this section, so only its recipes have one:

    cfg = load_config("recipes/namm_passkey_tiny.yaml", schema=NammRecipe)

`NammConfig.problems()` is the section's own validation; `longcpt.config.validate` asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from longcpt.config import Config, choice_problems, minimum_problems

# Inclusive lower bounds of the section's numeric keys (under `namm.`).
_MINIMUMS = {"hidden": 1, "population": 2, "generations": 1, "workers": 0, "cache_weight": 0, "passkey.trials": 1}


@dataclass
class NammPasskeyConfig:
    """Passkey prompts NAMM evolution scores on (`longcpt.data.passkey`); keep them within the
    model's trained length and the seed apart from the evaluation's (0)."""

    lengths: list[int] = field(default_factory=lambda: [1024])  # each >= namm.update_every
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2  # prompts per (length, depth), new keys every generation; as many for validation
    split_digits: bool = False  # as the model was fine-tuned (make_passkey.py --split-digits)
    seed: int = 1


@dataclass
class NammConfig:
    """`longcpt namm train`: evolve a NAMM (`longcpt.namm`) for the frozen `model.pretrained`."""

    scorer: str = "bam"  # bam (the reference's) | mlp (this project's cheaper one)
    selection: str = "reference"  # reference (same count in every head of a layer) | per_head (score >= 0)
    hidden: int = 32  # BAM attention width
    update_every: int = 512  # tokens between evictions (a multiple of 16, the spectrogram hop)
    population: int = 32
    generations: int = 100
    sigma: float = 0.065  # initial CMA-ES step size
    covariance: str = "diagonal"  # diagonal (sep-CMA-ES, linear cost) | full (the reference's; O(n^3) per generation)
    seed: int = 0
    workers: int = 0  # processes evaluating the population; 0 = one per GPU, else one per CPU core
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    cache_weight: float = 0.0  # fitness -= cache_weight * kv_kept_mean: favours a smaller cache
    init: str | None = None  # policy file to start from (a previous stage), else the all-zero policy
    passkey: NammPasskeyConfig = field(default_factory=NammPasskeyConfig)

    def problems(self) -> list[str]:
        """Every problem of the section, each naming the key, the value and the fix."""
        from longcpt.data.fitness import TASKS

        problems = (
            choice_problems("namm.scorer", self.scorer, ("bam", "mlp"))
            + choice_problems("namm.selection", self.selection, ("reference", "per_head"))
            + choice_problems("namm.covariance", self.covariance, ("diagonal", "full"))
            + minimum_problems(self, "namm.", _MINIMUMS)
        )
        if self.update_every < 16 or self.update_every % 16:
            problems.append(f"namm.update_every={self.update_every}: must be a positive multiple of 16 "
                            "(the spectrogram's hop), e.g. 512")
        if self.sigma <= 0:
            problems.append(f"namm.sigma={self.sigma}: must be > 0 (the reference uses 0.065)")
        if not self.tasks:
            problems.append(f"namm.tasks=[]: name at least one task ({', '.join(TASKS)})")
        for task in self.tasks:
            problems += choice_problems("namm.tasks", task, tuple(TASKS))
        passkey = self.passkey
        if not passkey.lengths or min(passkey.lengths) < 1:
            problems.append(f"namm.passkey.lengths={passkey.lengths}: give prompt lengths in tokens, e.g. [1024]")
        elif "passkey" in self.tasks and min(passkey.lengths) < self.update_every:
            short = [n for n in passkey.lengths if n < self.update_every]
            problems.append(f"namm.passkey.lengths={passkey.lengths}: {short} shorter than namm.update_every="
                            f"{self.update_every}; such a prompt ends before the first eviction, so no policy can "
                            "change its score (use lengths >= namm.update_every, or a smaller namm.update_every)")
        if not passkey.depths or not all(0 <= d <= 1 for d in passkey.depths):
            problems.append(f"namm.passkey.depths={passkey.depths}: give depths in [0, 1], e.g. [0, 0.5, 1]")
        if self.init is not None and not Path(self.init).is_file():
            problems.append(f"namm.init={self.init!r}: no such policy file (or null to start from the all-zero policy)")
        return problems


@dataclass
class NammRecipe(Config):
    """A `longcpt namm train` recipe: the training schema plus the `namm:` section."""

    namm: NammConfig = field(default_factory=NammConfig)
