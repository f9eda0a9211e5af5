"""Fitness tasks for NAMM evolution (`longcpt namm train`): (prompt, answer) examples from this
project's generators.

A task is a function `(namm config, tokenizer, draw) -> list[Example]` registered under its name
in `TASKS`; a recipe lists the ones to use in `namm.tasks`. `draw` picks the sample: generation g
of the evolution scores its members on draw g (a fresh sample every generation, as the reference
resamples its prompts every step), and the policy to report is chosen on draw `VALIDATION`,
which no generation draws. A draw is a pure function of its number, so a resumed run sees the
same prompts. Every task is scored the same way
(`longcpt.namm.evolve`): the model reads the prompt and the answer (teacher forcing) through the
evicting cache, and an example's score is the answer's per-token geometric-mean probability.
Adding the RULER-style tasks is one more registered function that builds their prompts and
answers (`@register_task("ruler_niah")`), and a `namm.<task>` section for its settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from longcpt.errors import LongcptError


@dataclass(frozen=True)
class Example:
    """One scored example: the prompt's and the answer's token ids."""

    task: str
    prompt: tuple[int, ...]
    answer: tuple[int, ...]


TASKS: dict[str, Callable[..., list[Example]]] = {}
VALIDATION = -1  # the draw that chooses the policy; training draws are the generations 0, 1, ...


def register_task(name: str) -> Callable:
    """Decorator adding a task builder to `TASKS` under `name`."""

    def add(fn: Callable[..., list[Example]]) -> Callable[..., list[Example]]:
        TASKS[name] = fn
        return fn

    return add


@register_task("passkey")
def passkey_examples(namm, tokenizer, draw: int) -> list[Example]:
    """Passkey prompts (`namm.passkey`: lengths x depths x trials) with keys of its own seed: draw d
    uses the keys of trials d * trials .. (d + 1) * trials - 1, so no two draws share a trial (the
    validation draw -1 takes trials -trials .. -1)."""
    from longcpt.data.passkey import PasskeyPromptBuilder, passkey_key

    settings = namm.passkey
    builder = PasskeyPromptBuilder(tokenizer, split_digits=settings.split_digits)
    short = [n for n in settings.lengths if n < builder.min_length]
    if short:
        raise LongcptError(f"namm.passkey.lengths: {short} too short for this tokenizer (use >= {builder.min_length})")
    examples = []
    for length in settings.lengths:
        for depth in settings.depths:
            for trial in range(settings.trials):
                key = passkey_key(settings.seed, length, depth, draw * settings.trials + trial)
                ex = builder.build(length, float(depth), key)
                examples.append(Example("passkey", tuple(ex.input_ids), tuple(ex.answer_ids)))
    return examples


def build_examples(namm, tokenizer, draw: int) -> list[Example]:
    """Every example of draw `draw` of the tasks `namm.tasks` names, task by task."""
    return [ex for name in namm.tasks for ex in TASKS[name](namm, tokenizer, draw)]
