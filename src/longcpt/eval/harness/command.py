"""`longcpt eval harness`: lm-evaluation-harness tasks on a longcpt model, with any attention kind.

    longcpt eval harness --model DIR_OR_CKPT --tasks longbench_hotpotqa,mmlu [--include-path DIR]
        [--limit N] [--num-fewshot K] [--attention KIND --attention-options JSON]
        [--rope-scaling JSON] [--max-length N] --output OUT

Each task runs through `lm_eval.simple_evaluate` with the `longcpt` backend (backend.py), one task
at a time, and the harness writes its own files. Tasks come from the harness (`mmlu`, `hellaswag`,
`longbench_*`, `longbench2_*`, `niah_*`, `babilong`, ...) and from task YAMLs in `--include-path`
(local data files: docs/evaluation.md). Tasks that build their data with the model's tokenizer
(RULER) are given it: the harness's `metadata` holds `tokenizer` (the model's tokenizer folder)
besides `--metadata`.

Outputs in OUT:
    run.json                               kind, options, RoPE scaling, max_length, tasks, limit,
                                           few-shot, seed and the versions of longcpt, lm_eval,
                                           torch and transformers
    TASK/results_<time>.json               the harness's results file of TASK
    TASK/samples_<subtask>_<time>.jsonl    the harness's samples: document, prompt, response, score
    results.json                           every finished task: its metrics, seconds, tokens/s,
                                           kv_kept (evicting kinds) and inputs cut to max_length
    responses_rank0.db                     the harness's response cache (`lm_eval --use_cache`)

Resume: running the same command again skips the tasks already in results.json; a task that was
interrupted starts again but finds every request answered before in the response cache, so only
the rest runs. Adding tasks later runs only those. Other settings in the same OUT are refused.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import metadata as package_metadata
from pathlib import Path

from longcpt.errors import LongcptError
from longcpt.eval.predictions import check_run
from longcpt.fsio import atomic_write_json

# Settings a resumed run must share with the results already in OUT (tasks may be added).
RUN_KEYS = ("model", "attention", "attention_options", "rope_scaling", "max_length", "include_path", "limit",
            "num_fewshot", "seed", "gen_kwargs", "metadata")
SUMMARY = "results.json"
RESPONSES = "responses"  # the harness adds "_rank0.db"


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a harness figure depends on."""
    out = {}
    for name in ("longcpt", "lm_eval", "torch", "transformers"):
        try:
            out[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            out[name] = None
    return out


def task_folder(output: Path, task: str) -> Path:
    """Where the harness's files of `task` go (a task name never holds a path separator)."""
    return output / task.replace("/", "_")


def task_manager(cls, include_path: str | None, tasks: list[str], meta: dict):
    """The harness's `TaskManager`: the `--include-path` tasks alone when they are all that is asked
    for (indexing the harness's ~15,000 task YAMLs takes ~30 s), else those and the harness's."""
    if include_path is not None:
        local = cls(include_path=include_path, include_defaults=False, metadata=meta)
        if all(task in local.all_tasks for task in tasks):
            return local
    return cls(include_path=include_path, metadata=meta)


def run_task(lm, task: str, folder: Path, manager, args) -> dict:
    """Evaluate one task (or group) with the harness; write its files into `folder`.

    Returns:
        The summary row of the task: the harness's metrics and longcpt's telemetry.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    from longcpt.eval.harness.backend import new_stats
    from longcpt.model.generation import mean_cache_use

    lm.stats = new_stats()
    tracker = EvaluationTracker(output_path=str(folder / "results.json"))  # -> folder/results_<time>.json
    start = time.perf_counter()
    results = simple_evaluate(
        model=lm, tasks=[task], num_fewshot=args.num_fewshot, limit=args.limit, log_samples=True,
        evaluation_tracker=tracker, task_manager=manager, use_cache=str(folder.parent / RESPONSES),
        gen_kwargs=args.gen_kwargs, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )
    seconds = time.perf_counter() - start
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for name in results["configs"]:
        tracker.save_results_samples(task_name=name, samples=samples[name])
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    stats = lm.stats
    model_seconds = stats["seconds"]
    return {
        "results": results["results"],
        "groups": results.get("groups", {}),
        "n_samples": results.get("n-samples", {}),
        "seconds": round(seconds, 2),
        "tokens": stats["tokens"],
        "tokens_per_second": round(stats["tokens"] / model_seconds, 1) if stats["tokens"] and model_seconds > 0 else None,
        "truncated": stats["truncated"],
        **mean_cache_use(stats["cache_use"]),
    }


def add_arguments(parser) -> None:
    """The flags of `longcpt eval harness`."""
    from longcpt.argtypes import csv_list, json_object, positive_int
    from longcpt.eval.loading import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--tasks", type=csv_list(str), required=True,
                        help="harness task or group names, comma-separated (e.g. longbench_hotpotqa,mmlu,hellaswag)")
    parser.add_argument("--include-path", default=None, metavar="DIR",
                        help="folder of task YAMLs added to the harness's (local data: dataset_path: json + data_files)")
    parser.add_argument("--limit", type=positive_int, default=None, help="the first N documents of each task only")
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (default: the task's)")
    parser.add_argument("--output", required=True, help="output folder (an interrupted run resumes there)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="longest input in tokens; longer ones lose tokens from the left (default: the model's "
                        "context length with its RoPE scaling; raise it for kinds that read past the window, e.g. infllm)")
    parser.add_argument("--gen-kwargs", type=json_object, default=None, metavar="JSON",
                        help="generation settings replacing the tasks' own, e.g. '{\"max_gen_toks\": 64}'")
    parser.add_argument("--metadata", type=json_object, default=None, metavar="JSON",
                        help="the harness's task metadata, e.g. '{\"max_seq_lengths\": [4096, 8192]}' for RULER "
                        "(the model's tokenizer is passed as \"tokenizer\")")
    parser.add_argument("--seed", type=int, default=0, help="few-shot draws and sampled generations")
    parser.add_argument("--batch-tokens", type=positive_int, default=32768,
                        help="inputs of equal length batched up to this many tokens")


def run(args) -> int:
    """The `longcpt eval harness` command."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LongcptError("`longcpt eval harness` needs EleutherAI's lm-evaluation-harness: "
                           "pip install 'longcpt[harness]'") from None
    from longcpt.eval.harness.backend import LongcptLM

    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise LongcptError(f"--include-path {args.include_path}: not a folder of task YAMLs")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = LongcptLM(args.model, attention=args.attention, attention_options=args.attention_options,
                   rope_scaling=args.rope_scaling, max_length=args.max_length, batch_tokens=args.batch_tokens,
                   prefill_chunk=args.prefill_chunk, seed=args.seed)
    meta = {"tokenizer": lm.tokenizer.name_or_path, **(args.metadata or {})}
    settings = {**lm.settings, "model": str(Path(args.model).resolve()),
                "include_path": str(Path(args.include_path).resolve()) if args.include_path else None,
                "tasks": args.tasks, "limit": args.limit, "num_fewshot": args.num_fewshot, "seed": args.seed,
                "gen_kwargs": args.gen_kwargs, "metadata": args.metadata or {}, "versions": versions()}
    check_run(output, settings, RUN_KEYS, products=(SUMMARY, RESPONSES + "_rank0.db"))
    summary_path = output / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"tasks": {}}
    manager = task_manager(TaskManager, args.include_path, args.tasks, meta)
    for task in args.tasks:
        if task in summary["tasks"]:
            print(f"{task}: done earlier (in {summary_path})")
            continue
        summary["tasks"][task] = run_task(lm, task, task_folder(output, task), manager, args)
        summary.update({k: settings[k] for k in ("model", "attention", "attention_options", "rope_scaling",
                                                 "max_length")})
        atomic_write_json(summary_path, summary)
        row = summary["tasks"][task]
        print(f"{task}: {row['seconds']} s, {row['tokens_per_second']} tok/s, kv_kept {row['kv_kept']}, "
              f"{row['truncated']} inputs cut to {lm.max_length} tokens")
    print(f"wrote {summary_path} and the harness's files under {output}/<task>/")
    return 0
