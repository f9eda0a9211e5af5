"""`longcpt eval passkey`: passkey retrieval swept over lengths x depths x trials.

    longcpt eval passkey --model DIR --lengths 1024,4096 --depths 0,0.5,1 --trials 5 --output OUT

For every (length, depth) cell, `trials` prompts with random keys (`longcpt.data.passkey`) are
decoded greedily; a trial is correct when the first integer of the generated text equals the key
(exact match, as Landmark Attention scores it). Prompts of a cell share their length, so they run
as one batch (up to `batch_tokens` tokens). Long prompts are fed in chunks through the model's
state (`longcpt.model.generation`): a KV cache for `full`, bounded memory for Infini-attention.

Outputs: `OUT/passkey.json` = {"results": [{"length", "depth", "accuracy",
"trials"}, ...], "samples": [...], ...} and the heatmap `OUT/passkey.png` (x length, y depth);
`OUT/predictions.jsonl` holds one row per prompt as it finishes and `OUT/run.json` the settings,
so the same command resumes an interrupted sweep, and more lengths, depths or trials later only
run what is missing (`longcpt.eval.predictions`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from longcpt.data.passkey import PasskeyPromptBuilder, passkey_key
from longcpt.errors import LongcptError
from longcpt.eval.throughput import CACHE_KEYS
from longcpt.fsio import atomic_write_json
from longcpt.model.generation import DEFAULT_PREFILL_CHUNK, attention_on, generate, visible_share

_INTEGER = re.compile(r"\d+")


def first_integer(text: str) -> int | None:
    """The first run of digits in `text` as an int, or None (how an answer is read)."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def _key_attention(state: dict, keys: list[list[int]], into: list) -> None:
    """`into[row]` = the attention mass the last query read gave the key tokens `keys[row]`."""
    into[:] = [attention_on(state, row, positions) for row, positions in enumerate(keys)]


def check_sweep(lengths: list[int], depths: list[float], min_length: int) -> None:
    """Raise one LongcptError naming every bad length or depth and the fix."""
    problems = []
    short = [n for n in lengths if n < min_length]
    if short:
        problems.append(f"--lengths {','.join(map(str, short))}: too short for this tokenizer (use >= {min_length})")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        problems.append(f"--depths {','.join(map(str, bad))}: depths must be in [0, 1] (0 = start, 1 = end)")
    if not lengths:
        problems.append("--lengths: empty (e.g. --lengths 1024,4096)")
    if not depths:
        problems.append("--depths: empty (e.g. --depths 0,0.5,1)")
    if problems:
        raise LongcptError("; ".join(problems))


# Settings a resumed run must share with the rows already written (more lengths, depths or
# trials only add rows).
RUN_KEYS = ("model", "rope_scaling", "attention", "attention_options", "seed", "split_digits")


def add_arguments(parser) -> None:
    """The flags of `longcpt eval passkey`."""
    from longcpt.argtypes import csv_list, positive_int
    from longcpt.eval.loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--lengths", type=csv_list(int), default=[1024, 4096], help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--depths", type=csv_list(float), default=[0.0, 0.5, 1.0], help="needle depths in [0, 1]")
    parser.add_argument("--trials", type=positive_int, default=5, help="prompts per (length, depth)")
    parser.add_argument("--output", required=True, help="output folder (an interrupted run resumes there)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-digits", action="store_true",
                        help="write the key one digit per token (for models fine-tuned on make_passkey.py --split-digits data)")


def sample_key(row: dict) -> tuple[int, float, int]:
    return int(row["length"]), float(row["depth"]), int(row["trial"])


def evaluate_passkey(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    batch_tokens: int = 32768,
    progress=None,
    split_digits: bool = False,
    predictions=None,
) -> dict:
    """Run the sweep and return the `passkey.json` content.

    Args:
        model: a longcpt `CausalLM` in eval mode.
        tokenizer: its transformers tokenizer.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        trials: prompts per (length, depth).
        seed: fixes the keys.
        prefill_chunk: prompt tokens per model call.
        batch_tokens: prompts of one cell are batched up to this many tokens.
        progress: an optional Rich `Progress` (see `longcpt.eval.progress`).
        split_digits: write the key one digit per token, as the fine-tuning data was
            (`longcpt.data.passkey`).
        predictions: an open `longcpt.eval.predictions.Predictions`: the samples already there are
            not run again, new ones are appended as each batch finishes (default: kept in memory).

    Returns:
        {"results": [{"length", "depth", "accuracy", "trials"}], "samples": [...],
        "by_length": {length: accuracy}, "seconds", "tokens_per_second", "generated" (of this run),
        "kv_kept", "kv_kept_mean", "kv_peak" (an evicting kind's cache at the end, through the
        prompt and at its largest, as shares of the full cache, mean over prompts: `cache_use`;
        else None), ...}. With a kind that attends part of the context (InfLLM), every result and
        sample also has "key_visible": the share of the key's digit tokens in the needle that the
        model could attend while answering (the last prompt token's step and the answer's; mean
        over steps and layers, `visible_share`), and "key_attention": the attention mass those
        tokens received from the last prompt token, the query that predicts the answer's first
        digit (mean over query heads and layers, `attention_on`).

    Raises:
        LongcptError: a length too short for the tokenizer or a depth outside [0, 1].
    """
    from longcpt.eval.throughput import Meter, batches, cache_report

    builder = PasskeyPromptBuilder(tokenizer, split_digits=split_digits)
    check_sweep(lengths, depths, builder.min_length)
    done = predictions.done if predictions is not None else {}
    missing = {(n, d): [t for t in range(trials) if (n, float(d), t) not in done] for n in lengths for d in depths}
    task = progress.add_task("passkey", total=sum(n * len(m) for (n, _), m in missing.items())) if progress else None
    meter = Meter()
    for (length, depth), todo in missing.items():
        for group in batches(todo, length, batch_tokens):
            examples = [builder.build(length, depth, passkey_key(seed, length, depth, t)) for t in group]
            for row in _answer(model, tokenizer, builder, examples, group, depth, prefill_chunk, meter):
                done[sample_key(row)] = row
                if predictions is not None:
                    predictions.append(row)
            if progress:
                progress.advance(task, length * len(group))
    rows = [done[(n, float(d), t)] for n in lengths for d in depths for t in range(trials)]
    results = [_cell(n, d, [r for r in rows if sample_key(r)[:2] == (n, float(d))]) for n in lengths for d in depths]
    by_length = {
        str(n): sum(r["accuracy"] for r in results if r["length"] == n) / len(depths) for n in lengths
    }
    return {
        "results": results,
        "by_length": by_length,
        "accuracy": sum(r["accuracy"] for r in results) / len(results),
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "seed": seed,
        "split_digits": split_digits,
        **meter.report(),
        **cache_report(rows),
        "samples": [_sample(r) for r in rows],
    }


def _answer(model, tokenizer, builder, examples, trials: list[int], depth: float, prefill_chunk: int, meter) -> list[dict]:
    """Decode one batch of prompts of one cell; one row per prompt (its cache use included)."""
    length = len(examples[0].input_ids)
    ids = torch.tensor([ex.input_ids for ex in examples])  # (B, length)
    new_tokens = max(len(ex.answer_ids) for ex in examples) + 3
    keys = [builder.key_positions(ex) for ex in examples]
    mass: list[float | None] = [None] * len(examples)  # filled after the prompt, before the answer
    state: dict = {}
    out = generate(model, ids, new_tokens, eos_id=tokenizer.eos_token_id, prefill_chunk=prefill_chunk, state=state,
                   on_prompt=functools.partial(_key_attention, keys=keys, into=mass))
    use = meter.add(length * len(examples), state, rows=len(examples)) or {}
    rows = []
    for i, (trial, ex, generated) in enumerate(zip(trials, examples, out.tolist())):
        text = tokenizer.decode(generated, skip_special_tokens=True)
        row = {"length": length, "depth": depth, "trial": trial, "key": ex.key,
               "needle_depth": round(ex.needle_depth, 4), "generated": text, "correct": first_integer(text) == ex.key}
        # A memory that attends part of the context: was the key among it, and attended?
        if (seen := visible_share(state, i, keys[i], length - 1)) is not None:
            row["key_visible"] = seen  # rounded in the report (`_sample`), whose cell means use these
        if mass[i] is not None:
            row["key_attention"] = mass[i]
        rows.append({**row, **use})
    return rows


def _sample(row: dict) -> dict:
    """A row as the report's `samples` show it: no cache figures, the memory's figures rounded."""
    return {k: round(v, 4) if k in _MEMORY_FIGURES else v for k, v in row.items() if k not in CACHE_KEYS}


_MEMORY_FIGURES = ("key_visible", "key_attention")


def _cell(length: int, depth: float, rows: list[dict]) -> dict:
    """One (length, depth) cell of the report: accuracy, and the means of the memory's figures."""
    cell = {"length": length, "depth": depth, "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "trials": len(rows)}
    for key in _MEMORY_FIGURES:
        values = [r[key] for r in rows if key in r]
        if values:
            cell[key] = round(sum(values) / len(values), 4)
    return cell


def write_passkey_outputs(report: dict, output: str | Path, title: str) -> tuple[Path, Path]:
    """Write `passkey.json` and the heatmap `passkey.png` into `output` (each atomically)."""
    from longcpt.eval.figures import passkey_heatmap

    output = Path(output)
    lengths, depths = report["lengths"], report["depths"]
    cell = {(r["length"], r["depth"]): r["accuracy"] for r in report["results"]}
    grid = [[cell[(n, d)] for n in lengths] for d in depths]
    json_path = atomic_write_json(output / "passkey.json", report)
    png_path = passkey_heatmap(lengths, depths, grid, title, output / "passkey.png")
    return json_path, png_path


def run(args) -> int:
    """The `longcpt eval passkey` command."""
    from longcpt.eval.loading import load_for_eval, model_label
    from longcpt.eval.predictions import Predictions
    from longcpt.eval.progress import token_progress

    model, tokenizer, settings = load_for_eval(args)
    split = getattr(args, "split_digits", False)
    check_sweep(args.lengths, args.depths, PasskeyPromptBuilder(tokenizer, split_digits=split).min_length)
    settings = {**settings, "model": str(Path(args.model).resolve()), "seed": args.seed, "split_digits": split}
    with token_progress() as progress, Predictions(args.output, settings, RUN_KEYS, sample_key,
                                                   "longcpt eval passkey") as predictions:
        report = evaluate_passkey(
            model, tokenizer, args.lengths, args.depths, args.trials, seed=args.seed,
            prefill_chunk=args.prefill_chunk, progress=progress, split_digits=split, predictions=predictions,
        )
    report.update(settings)
    label = model_label(args.model, args.rope_scaling, settings["attention"])
    title = f"passkey: {label}, {args.trials} trials per cell, mean {report['accuracy']:.0%}"
    json_path, png_path = write_passkey_outputs(report, args.output, title)
    for n, acc in report["by_length"].items():
        print(f"length {n:>8}: accuracy {acc:.1%}")
    print(f"wrote {json_path} and {png_path} ({report['tokens_per_second']} tok/s)")
    return 0
