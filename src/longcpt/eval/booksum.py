"""`longcpt eval booksum`: summarise prepared BookSum inputs, then score them with ROUGE.

    longcpt eval booksum --model DIR --data PREPARED --output OUT [--max-input-tokens N]
        [--max-new-tokens N] [--temperature T --top-p P --seed S] [--limit N]

Each example's prompt (`longcpt.data.booksum`) is decoded greedily (temperature 0) or sampled
(temperature/top-p, one seeded generator per example, so a resumed run draws the same samples).

Outputs (docs/reference.md, section 5):
  * `OUT/predictions.jsonl`, one row per example (`id`, `prediction`, `reference`, ...), appended
    and flushed as each example finishes. Running the same command again skips the ids already
    there, so an interrupted evaluation resumes where it stopped (a line cut by a crash is
    dropped and redone). `OUT/run.json` records the settings; resuming with other settings is
    refused rather than mixing two runs in one file.
  * `OUT/rouge.json` = {"rouge1", "rouge2", "rougeL", "rougeLsum", "overall", "n"}: mean
    F-measures x 100 from Google's `rouge-score` with stemming; with several references the
    best-scoring one counts (`score_multi`); `overall` is the geometric mean of rouge1, rouge2
    and rougeL, as Infini-attention's Table 4 and SCROLLS report it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from longcpt.errors import LongcptError
from longcpt.fsio import atomic_write_json
from longcpt.model.generation import DEFAULT_PREFILL_CHUNK, generate

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Settings that must match for a resumed run to continue the same predictions file.
RUN_KEYS = ("model", "data", "max_input_tokens", "max_new_tokens", "temperature", "top_p", "seed", "rope_scaling",
            "attention", "attention_options")


# ---------------------------------------------------------------------------------------------
# ROUGE


def sentence_lines(text: str) -> str:
    """One sentence per line: what `rougeLsum` splits summaries on.

    rouge-score's own splitter needs NLTK's punkt data (not available offline); a split after
    `.`, `!` or `?` followed by whitespace is the common substitute. It only affects rougeLsum.
    """
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus ROUGE: mean per-example F-measure x 100 for each type, plus the geometric mean.

    Args:
        predictions: one generated summary per example.
        references: the reference summaries of each example (best one counts).

    Returns:
        {"rouge1", "rouge2", "rougeL", "rougeLsum", "overall", "n"}.
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LongcptError("ROUGE needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi([sentence_lines(r) for r in refs], sentence_lines(prediction))
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    n = len(predictions)
    result = {k: 100 * totals[k] / n if n else 0.0 for k in ROUGE_TYPES}
    r1, r2, rl = result["rouge1"], result["rouge2"], result["rougeL"]
    result["overall"] = (r1 * r2 * rl) ** (1 / 3) if min(r1, r2, rl) > 0 else 0.0
    result["n"] = n
    return result


def example_generator(seed: int, example_id: str) -> torch.Generator:
    """A sampling generator that depends only on (seed, example id): stable across resumes."""
    return torch.Generator().manual_seed(random.Random(f"booksum:{seed}:{example_id}").getrandbits(63))


# ---------------------------------------------------------------------------------------------
# The command


def evaluate_booksum(
    model,
    tokenizer,
    dataset,
    output: str | Path,
    settings: dict,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    progress=None,
) -> dict:
    """Generate the missing predictions into `output/predictions.jsonl`, then write `rouge.json`.

    Args:
        model: a longcpt `CausalLM` in eval mode.
        tokenizer: its transformers tokenizer.
        dataset: rows with `id`, `text`, `summary`, `references` (`load_booksum`).
        output: output folder.
        settings: the `RUN_KEYS` (`max_input_tokens`, `max_new_tokens`, `temperature`, `top_p`,
            `seed`, ...) plus `limit`.
        prefill_chunk: prompt tokens per model call.
        progress: an optional Rich `Progress`.

    Returns:
        The `rouge.json` content.
    """
    from longcpt.data.booksum import booksum_prompt_ids
    from longcpt.eval.predictions import Predictions
    from longcpt.eval.throughput import Meter, cache_report

    limit = settings.get("limit")
    rows = [dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset)))]
    meter = Meter()
    with Predictions(output, settings, RUN_KEYS, lambda row: row["id"], "longcpt eval booksum") as predictions:
        done = predictions.done
        todo = [r for r in rows if r["id"] not in done]
        prompts = {r["id"]: booksum_prompt_ids(tokenizer, r["text"], settings["max_input_tokens"]) for r in todo}
        budget = sum(len(p) for p, _ in prompts.values()) + settings["max_new_tokens"] * len(todo)
        task = progress.add_task(f"booksum ({len(done)} done)", total=budget) if progress else None
        for row in todo:
            predictions.append(_summarise(model, tokenizer, row, *prompts[row["id"]], settings, prefill_chunk,
                                          meter, progress, task))
    scored = [done[r["id"]] for r in rows]
    result = rouge_scores([r["prediction"] for r in scored], [r["references"] for r in scored])
    result.update({k: settings.get(k) for k in ("attention", "attention_options")}, **meter.report(),
                  **cache_report(scored))
    atomic_write_json(Path(output) / "rouge.json", result)
    return result


def _summarise(model, tokenizer, row: dict, ids: list[int], truncated: bool, settings: dict, prefill_chunk: int,
               meter, progress, task) -> dict:
    """One example's summary, as its predictions row (with the cache use of an evicting kind)."""
    used = 0

    def advance(n: int) -> None:
        nonlocal used
        used += n
        progress.advance(task, n)

    state: dict = {}
    generated = generate(
        model, torch.tensor([ids]), settings["max_new_tokens"],
        temperature=settings["temperature"], top_p=settings["top_p"], eos_id=tokenizer.eos_token_id,
        prefill_chunk=prefill_chunk, generator=example_generator(settings["seed"], row["id"]),
        progress=advance if progress else None, state=state,
    )[0].tolist()
    if progress:  # stopped early at EOS: count the budget it did not use
        progress.advance(task, len(ids) + settings["max_new_tokens"] - used)
    use = meter.add(len(ids) + len(generated), state) or {"kv_kept": None}
    prediction = tokenizer.decode(generated, skip_special_tokens=True).strip()
    return {"id": row["id"], "prediction": prediction, "reference": row["summary"],
            "references": row["references"], "input_tokens": len(ids), "truncated": truncated,
            "generated_tokens": len(generated), **use}


def add_arguments(parser) -> None:
    """The flags of `longcpt eval booksum`."""
    from longcpt.argtypes import positive_int
    from longcpt.eval.loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="prepared BookSum data (data_prep/prepare_booksum.py)")
    parser.add_argument("--output", required=True, help="output folder (an interrupted run resumes there)")
    parser.add_argument("--max-input-tokens", type=positive_int, default=None)
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    """The `longcpt eval booksum` command."""
    from longcpt.data.booksum import load_booksum
    from longcpt.eval.loading import load_for_eval
    from longcpt.eval.progress import token_progress

    problems = []
    if args.temperature < 0:
        problems.append(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p {args.top_p}: must be in (0, 1]")
    if problems:
        raise LongcptError("; ".join(problems))
    dataset = load_booksum(args.data)
    model, tokenizer, model_settings = load_for_eval(args)
    settings = {
        **model_settings, "model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()),
        "max_input_tokens": args.max_input_tokens, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "limit": args.limit,
    }
    with token_progress() as progress:
        result = evaluate_booksum(model, tokenizer, dataset, args.output, settings, args.prefill_chunk, progress)
    print("  ".join(f"{k} {result[k]:.2f}" for k in (*ROUGE_TYPES, "overall")) + f"  (n={result['n']})")
    print(f"wrote {Path(args.output) / 'predictions.jsonl'} and {Path(args.output) / 'rouge.json'}")
    return 0

