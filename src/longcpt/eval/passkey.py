"""`longcpt eval passkey`: passkey retrieval swept over lengths x depths x trials.

    longcpt eval passkey --model DIR --lengths 1024,4096 --depths 0,0.5,1 --trials 5 --output OUT

For every (length, depth) cell, `trials` prompts with random keys (`longcpt.data.passkey`) are
decoded greedily; a trial is correct when the first integer of the generated text equals the key
(exact match, as Landmark Attention scores it). Prompts of a cell share their length, so they run
as one batch (up to `batch_tokens` tokens). Long prompts are fed in chunks through the model's
state (`longcpt.model.generation`): a KV cache for `full`, bounded memory for Infini-attention.

Outputs: `OUT/passkey.json` = {"results": [{"length", "depth", "accuracy",
"trials"}, ...], "samples": [...], ...} and the heatmap `OUT/passkey.png` (x length, y depth).
"""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path

import torch

from longcpt.data.passkey import PasskeyPromptBuilder, passkey_key
from longcpt.errors import LongcptError
from longcpt.fsio import atomic_write_json
from longcpt.model.generation import (
    DEFAULT_PREFILL_CHUNK,
    attention_on,
    cache_use,
    generate,
    mean_cache_use,
    visible_share,
)

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

    Returns:
        {"results": [{"length", "depth", "accuracy", "trials"}], "samples": [...],
        "by_length": {length: accuracy}, "seconds", "tokens_per_second", "kv_kept", "kv_kept_mean",
        "kv_peak" (an evicting kind's cache at the end, through the prompt and at its largest, as
        shares of the full cache: `cache_use`; else None), ...}. With a kind that attends part of the
        context (InfLLM), every result and sample also has "key_visible": the share of the key's
        digit tokens in the needle that the model could attend while answering (the last prompt
        token's step and the answer's; mean over steps and layers, `visible_share`), and
        "key_attention": the attention mass those tokens received from the last prompt token, the
        query that predicts the answer's first digit (mean over query heads and layers,
        `attention_on`).

    Raises:
        LongcptError: a length too short for the tokenizer or a depth outside [0, 1].
    """
    builder = PasskeyPromptBuilder(tokenizer, split_digits=split_digits)
    check_sweep(lengths, depths, builder.min_length)
    eos = tokenizer.eos_token_id
    task = progress.add_task("passkey", total=sum(lengths) * len(depths) * trials) if progress else None
    results, samples, kept = [], [], []
    start, tokens = time.perf_counter(), 0
    for length in lengths:
        per_batch = max(1, batch_tokens // length)
        for depth in depths:
            examples = [builder.build(length, depth, passkey_key(seed, length, depth, t)) for t in range(trials)]
            correct, visible, attended = 0, [], []
            for first in range(0, trials, per_batch):
                group = examples[first : first + per_batch]
                ids = torch.tensor([ex.input_ids for ex in group])  # (B, length)
                new_tokens = max(len(ex.answer_ids) for ex in group) + 3
                keys = [builder.key_positions(ex) for ex in group]
                mass: list[float | None] = [None] * len(group)  # filled after the prompt, before the answer
                state: dict = {}
                out = generate(model, ids, new_tokens, eos_id=eos, prefill_chunk=prefill_chunk, state=state,
                               on_prompt=functools.partial(_key_attention, keys=keys, into=mass))
                if (use := cache_use(state)) is not None:
                    kept.append(use)
                for trial, (ex, row) in enumerate(zip(group, out.tolist()), first):
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    ok = first_integer(text) == ex.key
                    correct += ok
                    sample = {"length": length, "depth": depth, "trial": trial, "key": ex.key,
                              "needle_depth": round(ex.needle_depth, 4), "generated": text, "correct": ok}
                    # A memory that attends part of the context: was the key among it, and attended?
                    if (seen := visible_share(state, trial - first, keys[trial - first], length - 1)) is not None:
                        sample["key_visible"] = round(seen, 4)
                        visible.append(seen)
                    if mass[trial - first] is not None:
                        sample["key_attention"] = round(mass[trial - first], 4)
                        attended.append(mass[trial - first])
                    samples.append(sample)
                tokens += length * len(group)
                if progress:
                    progress.advance(task, length * len(group))
            results.append({"length": length, "depth": depth, "accuracy": correct / trials, "trials": trials})
            if visible:
                results[-1]["key_visible"] = round(sum(visible) / len(visible), 4)
            if attended:
                results[-1]["key_attention"] = round(sum(attended) / len(attended), 4)
    seconds = time.perf_counter() - start
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
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        **mean_cache_use(kept),
        "samples": samples,
    }


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
    from longcpt.eval.progress import token_progress

    model, tokenizer, settings = load_for_eval(args)
    split = getattr(args, "split_digits", False)
    check_sweep(args.lengths, args.depths, PasskeyPromptBuilder(tokenizer, split_digits=split).min_length)
    with token_progress() as progress:
        report = evaluate_passkey(
            model, tokenizer, args.lengths, args.depths, args.trials, seed=args.seed,
            prefill_chunk=args.prefill_chunk, progress=progress, split_digits=split,
        )
    report.update(settings)
    label = model_label(args.model, args.rope_scaling, settings["attention"])
    title = f"passkey: {label}, {args.trials} trials per cell, mean {report['accuracy']:.0%}"
    json_path, png_path = write_passkey_outputs(report, args.output, title)
    for n, acc in report["by_length"].items():
        print(f"length {n:>8}: accuracy {acc:.1%}")
    print(f"wrote {json_path} and {png_path} ({report['tokens_per_second']} tok/s)")
    return 0
