"""`longcpt eval ruler`: RULER-style synthetic tasks at given lengths, scored like RULER.

    longcpt eval ruler --model DIR --lengths 4096,8192 --tasks niah_single,vt --samples N \
        --output OUT [--haystack PATH]

Prompts come from `longcpt.data.ruler` (made locally with the model's tokenizer, exact lengths).
Each is decoded greedily for its answer budget (RULER's `tokens_to_generate` for the task, or
twice the tokens of a correct answer if the tokenizer needs more), stopping at EOS; prompts of one (task, length) and the same token count run as one batch. Long prompts stream
through the model's state in chunks (`longcpt.model.generation`): a KV cache for `full`, the
compressive memory for Infini-attention, the evicting cache of an inference-time memory kind.

Scoring is RULER's `string_match_all`: the share of a sample's references found,
case-insensitively, in the prediction; a task's score is the mean over its samples x 100, and the
average at a length is the mean over tasks.

Outputs:
  * `OUT/predictions.jsonl`: one row per sample, {"task", "length", "index", "prompt_tokens",
    "prediction", "references", "score", ...}, appended as each batch finishes; the same command
    resumes an interrupted run, and adding tasks, lengths or samples later only generates what is
    missing (`longcpt.eval.predictions`; `OUT/run.json` holds the settings that must not change).
  * `OUT/ruler.json`: {"results": [{"task", "length", "score", "n"}, ...], "average": {LENGTH:
    score}, ...} for the requested tasks x lengths x samples.
  * `OUT/ruler.png`: score by length, one line per task and the average.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from longcpt.data.ruler import RulerGenerator, check_tasks
from longcpt.errors import LongcptError
from longcpt.fsio import atomic_write_json
from longcpt.model.generation import DEFAULT_PREFILL_CHUNK, generate

# Settings a resumed run must share with the predictions already written.
RUN_KEYS = ("model", "haystack", "seed", "rope_scaling", "attention", "attention_options")
_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(text: str) -> str:
    """RULER's post-processing: control characters become newlines, outer whitespace goes."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Share of `references` found, case-insensitively, as substrings of `prediction` (in [0, 1])."""
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


def task_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's task score: mean `string_match_all` over samples x 100 (0 for no samples)."""
    if not predictions:
        return 0.0
    return 100 * sum(string_match_all(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


def check_lengths(generator: RulerGenerator, tasks: Sequence[str], lengths: Sequence[int]) -> None:
    """Raise one LongcptError naming every (length, task) pair that cannot be built, with the minimum."""
    if not lengths:
        raise LongcptError("--lengths: empty (e.g. --lengths 4096,8192)")
    problems = []
    for task in tasks:
        need = generator.min_length(task)
        short = [n for n in lengths if n < need]
        if short:
            problems.append(f"--lengths {','.join(map(str, short))}: too short for {task} with this tokenizer "
                            f"(use >= {need})")
    if problems:
        raise LongcptError("; ".join(problems))


def row_key(row: dict) -> tuple[str, int, int]:
    return row["task"], int(row["length"]), int(row["index"])


def evaluate_ruler(
    model,
    tokenizer,
    generator: RulerGenerator,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    output: str | Path,
    settings: dict,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    batch_tokens: int = 32768,
    progress=None,
) -> dict:
    """Generate the missing predictions into `output/predictions.jsonl` and return `ruler.json`.

    Args:
        model: a longcpt `CausalLM` in eval mode.
        tokenizer: its transformers tokenizer.
        generator: the prompt builder (tokenizer and haystack).
        tasks: task names (`longcpt.data.ruler.TASKS`).
        lengths: prompt lengths in tokens.
        samples: prompts per (task, length).
        output: output folder.
        settings: what `run.json` and `ruler.json` record; `RUN_KEYS` must match on resume
            (`seed` also fixes the prompts).
        prefill_chunk: prompt tokens per model call.
        batch_tokens: prompts of one (task, length) are batched up to this many tokens.
        progress: an optional Rich `Progress`.

    Returns:
        {"results": [{"task", "length", "score", "n"}], "average": {length: score}, "tasks",
        "lengths", "samples", "seconds", "tokens_per_second", "kv_kept", ...settings}.

    Raises:
        LongcptError: unknown task, a length too short for a task, or predictions from other settings.
    """
    from longcpt.eval.predictions import Predictions
    from longcpt.eval.throughput import Meter, batches, cache_report

    check_tasks(tasks)
    check_lengths(generator, tasks, lengths)
    seed = settings.get("seed", 0)
    meter = Meter()
    with Predictions(output, settings, RUN_KEYS, row_key, "longcpt eval ruler") as predictions:
        done = predictions.done
        todo = [(t, n, i) for t in tasks for n in lengths for i in range(samples) if (t, n, i) not in done]
        groups: dict[tuple[str, int, int], list] = defaultdict(list)  # (task, length, prompt tokens) -> samples
        for task, length, index in todo:
            sample = generator.sample(task, length, index, seed)
            groups[(task, length, len(sample.input_ids))].append(sample)
        budget = sum(len(s.input_ids) + s.max_new_tokens for group in groups.values() for s in group)
        bar = progress.add_task(f"ruler ({len(done)} done)", total=budget) if progress else None
        for (task, length, n_tokens), group in groups.items():
            for batch in batches(group, n_tokens, batch_tokens):
                for row in _answer(model, tokenizer, batch, task, length, n_tokens, prefill_chunk, meter):
                    predictions.append(row)
                if progress:
                    progress.advance(bar, sum(n_tokens + s.max_new_tokens for s in batch))
    results = []
    for task in tasks:
        for length in lengths:
            rows = [done[(task, length, i)] for i in range(samples)]
            score = task_score([r["prediction"] for r in rows], [r["references"] for r in rows])
            results.append({"task": task, "length": length, "score": round(score, 2), "n": len(rows)})
    average = {str(n): round(sum(r["score"] for r in results if r["length"] == n) / len(tasks), 2) for n in lengths}
    every = [done[(t, n, i)] for t in tasks for n in lengths for i in range(samples)]
    return {
        "results": results,
        "average": average,
        "tasks": list(tasks),
        "lengths": list(lengths),
        "samples": samples,
        **settings,
        **meter.report(),
        **cache_report(every),
    }


def _answer(model, tokenizer, batch, task: str, length: int, n_tokens: int, prefill_chunk: int, meter) -> list[dict]:
    """Decode one batch of prompts of one (task, length) with `n_tokens` tokens each; one row per prompt."""
    ids = torch.tensor([s.input_ids for s in batch])  # (B, n_tokens)
    state: dict = {}
    new_tokens = max(s.max_new_tokens for s in batch)
    out = generate(model, ids, new_tokens, eos_id=tokenizer.eos_token_id, prefill_chunk=prefill_chunk,
                   state=state)  # (B, N)
    use = meter.add(n_tokens * len(batch), state, rows=len(batch)) or {"kv_kept": None}
    rows = []
    for sample, row_ids in zip(batch, out.tolist()):
        prediction = clean_prediction(tokenizer.decode(row_ids, skip_special_tokens=True))
        rows.append({"task": task, "length": length, "index": sample.index, "prompt_tokens": n_tokens,
                     "prediction": prediction, "references": sample.references,
                     "score": 100 * string_match_all(prediction, sample.references), **use})
    return rows


def write_ruler_outputs(report: dict, output: str | Path, title: str) -> tuple[Path, Path]:
    """Write `ruler.json` and the plot `ruler.png` into `output` (each atomically)."""
    from longcpt.eval.figures import ruler_plot

    output = Path(output)
    scores = {(r["task"], r["length"]): r["score"] for r in report["results"]}
    lines = {t: [scores[(t, n)] for n in report["lengths"]] for t in report["tasks"]}
    if len(report["tasks"]) > 1:
        lines["average"] = [report["average"][str(n)] for n in report["lengths"]]
    json_path = atomic_write_json(output / "ruler.json", report)
    png_path = ruler_plot(report["lengths"], lines, title, output / "ruler.png")
    return json_path, png_path


def add_arguments(parser) -> None:
    """The flags of `longcpt eval ruler`."""
    from longcpt.argtypes import csv_list, positive_int
    from longcpt.data.ruler import TASKS
    from longcpt.eval.loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--lengths", type=csv_list(int), default=[4096, 8192], help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--tasks", type=csv_list(str), default=list(TASKS),
                        help=f"comma-separated, from {','.join(TASKS)} (default: all)")
    parser.add_argument("--samples", type=positive_int, default=25, help="prompts per (task, length)")
    parser.add_argument("--output", required=True, help="output folder (an interrupted run resumes there)")
    parser.add_argument("--haystack", default=None, metavar="PATH",
                        help="real text for the niah/vt haystack: a prepared corpus (made with the model's tokenizer) "
                        "or .jsonl/.json/.parquet/.txt files (default: RULER's repeated noise sentences)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every prompt")
    parser.add_argument("--batch-tokens", type=positive_int, default=32768, help="prompts batched up to this many tokens")


def run(args) -> int:
    """The `longcpt eval ruler` command."""
    from longcpt.data.ruler import load_haystack
    from longcpt.eval.loading import load_for_eval, model_label
    from longcpt.eval.progress import token_progress

    check_tasks(args.tasks)
    if not args.lengths:
        raise LongcptError("--lengths: empty (e.g. --lengths 4096,8192)")
    model, tokenizer, model_settings = load_for_eval(args)
    haystack = None
    if args.haystack is not None:
        haystack = load_haystack(args.haystack, tokenizer, max_tokens=2 * max(args.lengths))
    generator = RulerGenerator(tokenizer, haystack)
    check_lengths(generator, args.tasks, args.lengths)
    settings = {**model_settings, "model": str(Path(args.model).resolve()),
                "haystack": str(Path(args.haystack).resolve()) if args.haystack else "noise", "seed": args.seed}
    with token_progress() as progress:
        report = evaluate_ruler(model, tokenizer, generator, args.tasks, args.lengths, args.samples, args.output,
                                settings, prefill_chunk=args.prefill_chunk, batch_tokens=args.batch_tokens,
                                progress=progress)
    label = model_label(args.model, args.rope_scaling, model_settings["attention"])
    title = f"RULER: {label}, {args.samples} samples per task and length"
    json_path, png_path = write_ruler_outputs(report, args.output, title)
    width = max(len(t) for t in args.tasks)
    print(f"{'task':<{width}} " + " ".join(f"{n:>8}" for n in args.lengths))
    scores = {(r["task"], r["length"]): r["score"] for r in report["results"]}
    for task in args.tasks:
        print(f"{task:<{width}} " + " ".join(f"{scores[(task, n)]:>8.1f}" for n in args.lengths))
    print(f"{'average':<{width}} " + " ".join(f"{report['average'][str(n)]:>8.1f}" for n in args.lengths))
    print(f"wrote {json_path}, {png_path} and {Path(args.output) / 'predictions.jsonl'} "
          f"({report['tokens_per_second']} tok/s)")
    return 0
