"""Fitness tasks for NAMM evolution (`longcpt namm train`): (prompt, answer) examples from this
project's generators.

A task is a function `(namm config, tokenizer) -> list[Example]` registered under its name in
`TASKS`; a recipe lists the ones to use in `namm.tasks`. Every task is scored the same way
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


def register_task(name: str) -> Callable:
    """Decorator adding a task builder to `TASKS` under `name`."""

    def add(fn: Callable[..., list[Example]]) -> Callable[..., list[Example]]:
        TASKS[name] = fn
        return fn

    return add


@register_task("passkey")
def passkey_examples(namm, tokenizer) -> list[Example]:
    """Passkey prompts (`namm.passkey`: lengths x depths x trials), keys drawn from its own seed."""
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
                ex = builder.build(length, float(depth), passkey_key(settings.seed, length, depth, trial))
                examples.append(Example("passkey", tuple(ex.input_ids), tuple(ex.answer_ids)))
    return examples


def build_examples(namm, tokenizer) -> list[Example]:
    """Every example of the tasks `namm.tasks` names, task by task."""
    return [ex for name in namm.tasks for ex in TASKS[name](namm, tokenizer)]
