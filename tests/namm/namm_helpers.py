"""A tiny frozen model and a task it can do, for NAMM evolution tests (no hub, no fine-tuning).

The `continue` task asks a random model to continue random prompts with what it itself predicts
greedily with the full cache, so every example is answered by the full cache by construction, and
evicting the wrong tokens changes the answer's probability.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # run_namm.py imports this module outside pytest

from tiny import bpe_tokenizer, tiny_llama  # noqa: E402

from longcpt.data.fitness import TASKS, Example  # noqa: E402

PROMPT_LEN, ANSWER_LEN, N_EXAMPLES = 64, 4, 4


def make_model_dir(path: Path) -> Path:
    tokenizer = bpe_tokenizer(200)
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def register_continue_task(model_dir: Path) -> None:
    """Register `continue`: answers are the full-cache model's own greedy continuation."""
    from longcpt.model import from_pretrained
    from longcpt.model.generation import generate

    def build(namm, tokenizer, draw: int) -> list[Example]:
        model = from_pretrained(model_dir, attention="full").eval()
        g = torch.Generator().manual_seed(namm.seed * 1000 + draw + 1)  # a new sample every draw
        prompts = torch.randint(3, len(tokenizer), (N_EXAMPLES, PROMPT_LEN), generator=g)
        answers = generate(model, prompts, ANSWER_LEN)
        return [Example("continue", tuple(p.tolist()), tuple(a.tolist())) for p, a in zip(prompts, answers)]

    TASKS["continue"] = build
