"""Evaluations: one module each, `longcpt eval NAME`.

An evaluation's module declares its flags and its command:

    def add_arguments(parser): ...   # its own flags; `loading.add_model_arguments` adds the shared
                                     # model flags (--model, --rope-scaling, --attention, ...)
    def run(args) -> int: ...        # load (`loading.load_for_eval`), evaluate, write its outputs

and shares the rest: `predictions.py` (run.json and the resumable rows every evaluation appends
as it goes), `throughput.py` (seconds, tokens/s and the KV-cache use of an evaluating kind),
`progress.py` (the progress bar), `figures.py`. `EVALS` registers it: one line, which the command
line reads without importing the module (so `longcpt --help` stays instant). docs/extending.md
lists what a new evaluation touches.
"""

from __future__ import annotations

# name -> (module with add_arguments/run, one line of help)
EVALS: dict[str, tuple[str, str]] = {
    "passkey": ("longcpt.eval.passkey", "passkey retrieval sweep -> passkey.json + passkey.png"),
    "booksum": ("longcpt.eval.booksum", "summarise BookSum inputs -> predictions.jsonl + rouge.json"),
    "ppl": ("longcpt.eval.ppl", "perplexity by position bucket -> ppl.json + ppl.png"),
    "ruler": ("longcpt.eval.ruler", "RULER-style synthetic tasks -> ruler.json + predictions.jsonl + ruler.png"),
    "harness": ("longcpt.eval.harness.command", "lm-evaluation-harness tasks (LongBench, RULER, MMLU, ...) through "
                "the longcpt backend -> the harness's results and samples + results.json"),
}


def register_eval(name: str, module: str, help_text: str) -> None:
    """Register `longcpt eval NAME`, run by `module` (its `add_arguments` and `run`)."""
    EVALS[name] = (module, help_text)
