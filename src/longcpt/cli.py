"""`longcpt` command line: train, plan, export, eval {passkey, booksum, ppl, ruler, harness}, namm train,
doctor (docs/reference.md).

Each command is implemented by a `run(args)` function in its own module, imported only when the
command runs so that `--help` is instant. User errors (`LongcptError`) print one message and exit
with status 2; argparse reports bad flags the same way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings

from longcpt import early_signals  # standard library only
from longcpt.data.ruler import TASKS as RULER_TASKS  # standard library only: --help stays instant
from longcpt.errors import DeprecatedKeyWarning, LongcptError

# command -> module providing run(args)
COMMANDS = {
    "train": "longcpt.lit.train",
    "export": "longcpt.export.convert",
    "eval passkey": "longcpt.eval.passkey",
    "eval booksum": "longcpt.eval.booksum",
    "eval ppl": "longcpt.eval.ppl",
    "eval ruler": "longcpt.eval.ruler",
    "eval harness": "longcpt.eval.harness.command",
    "namm train": "longcpt.namm.evolve",
    "doctor": "longcpt.doctor",
    "plan": "longcpt.plan.report",
}


def csv_list(kind):
    """An argparse `type` for a non-empty comma-separated list of `kind` ("1024,4096" -> [1024, 4096]).

    Blank items are skipped; an empty list or an item `kind` refuses is an argparse error naming the
    text. The data_prep scripts use it too.
    """

    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"rope_type\": \"dynamic\", \"factor\": 1.0}}', got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], e.g. 0.4, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcpt",
        description="Continual pretraining of long-context Llama-family models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="continual pretraining / fine-tuning from a YAML recipe")
    train.add_argument("recipe", help="recipe YAML (see recipes/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf overrides, e.g. trainer.max_steps=10")
    train.set_defaults(command_name="train")

    plan = sub.add_parser("plan", help="per-GPU memory and step time of a recipe; does it fit, and what to change")
    plan.add_argument("recipe", help="recipe YAML (see recipes/)")
    plan.add_argument("overrides", nargs="*", metavar="key=value",
                      help="OmegaConf overrides, e.g. strategy.sequence_parallel=2 data.seq_len=131072")
    plan.add_argument("--gpu-memory", default="80GiB", metavar="SIZE",
                      help="memory of one GPU, e.g. 80GiB, 40GB, 24576MiB (default: 80GiB)")
    plan.add_argument("--gpu-tflops", type=_positive_float, default=None, metavar="TFLOPS",
                      help="dense peak TFLOP/s of one GPU (default: A100, 312 in bf16, 156 in 32-true)")
    plan.add_argument("--host-memory", default=None, metavar="SIZE",
                      help="host memory of one node: offload is suggested only where it fits (default: no limit; "
                      "the plan states the host memory offload needs)")
    plan.add_argument("--mfu", type=_fraction, default=0.4,
                      help="assumed model FLOPs utilisation: model FLOPs only, recomputation excluded (default: 0.4)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(command_name="plan")

    export = sub.add_parser("export", help="Lightning .ckpt or DeepSpeed checkpoint -> Hugging Face folder")
    export.add_argument("checkpoint", help="a .ckpt file, a DeepSpeed checkpoint folder, or a run's out_dir")
    export.add_argument("--output", required=True, help="output HF folder (written atomically)")
    export.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="weight dtype (default: as trained)")
    export.add_argument("--tokenizer", default=None, help="tokenizer folder to copy (default: the run's)")
    export.set_defaults(command_name="export")

    doctor = sub.add_parser("doctor", help="check that every path works on this machine (run it first on a new cluster)",
                            description="Environment, document kernels against a dense reference, and a real "
                            "training step per strategy; a PASS/FAIL/SKIP table (docs/doctor.md).")
    doctor.add_argument("--recipe", default=None, help="the recipe you will train (its precision, attention, "
                        "strategy, out_dir and model are checked and timed)")
    doctor.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as for train")
    doctor.add_argument("--json", action="store_true", help="print the results as JSON (for CI)")
    doctor.add_argument("--quick", action="store_true", help="smaller shapes; no multi-process CPU runs")
    doctor.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's bf16 peak for MFU when its name is not in the built-in table")
    doctor.set_defaults(command_name="doctor")

    ev = sub.add_parser("eval", help="evaluate an exported model: passkey, booksum, ppl, ruler, harness")
    evsub = ev.add_subparsers(dest="task", required=True, metavar="TASK")

    pk = evsub.add_parser("passkey", help="passkey retrieval sweep -> passkey.json + passkey.png")
    pk.add_argument("--model", required=True, help="exported HF folder (or a training checkpoint)")
    pk.add_argument("--lengths", type=csv_list(int), default=[1024, 4096], help="prompt lengths in tokens, comma-separated")
    pk.add_argument("--depths", type=csv_list(float), default=[0.0, 0.5, 1.0], help="needle depths in [0, 1]")
    pk.add_argument("--trials", type=_positive_int, default=5, help="prompts per (length, depth)")
    pk.add_argument("--output", required=True, help="output folder")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--prefill-chunk", type=_positive_int, default=4096, help="prompt tokens per model call")
    pk.add_argument("--split-digits", action="store_true",
                    help="write the key one digit per token (for models fine-tuned on make_passkey.py --split-digits data)")
    pk.set_defaults(command_name="eval passkey")

    bs = evsub.add_parser("booksum", help="summarise BookSum inputs -> predictions.jsonl + rouge.json")
    bs.add_argument("--model", required=True)
    bs.add_argument("--data", required=True, help="prepared BookSum data (data_prep/prepare_booksum.py)")
    bs.add_argument("--output", required=True)
    bs.add_argument("--max-input-tokens", type=_positive_int, default=None)
    bs.add_argument("--max-new-tokens", type=_positive_int, default=256)
    bs.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    bs.add_argument("--top-p", type=float, default=1.0)
    bs.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N examples only")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--prefill-chunk", type=_positive_int, default=4096, help="prompt tokens per model call")
    bs.set_defaults(command_name="eval booksum")

    ppl = evsub.add_parser("ppl", help="perplexity by position bucket -> ppl.json + ppl.png")
    ppl.add_argument("--model", required=True)
    ppl.add_argument("--data", required=True, help="prepared corpus (data_prep/prepare_corpus.py) of long documents")
    ppl.add_argument("--seq-len", type=_positive_int, required=True)
    ppl.add_argument("--output", required=True)
    ppl.add_argument("--bucket", type=_positive_int, default=None, help="bucket width in tokens (default: seq_len/8, rounded up)")
    ppl.add_argument("--max-docs", type=_positive_int, default=32)
    ppl.add_argument("--chunk", type=_positive_int, default=4096, help="tokens per model call (state carried across)")
    ppl.set_defaults(command_name="eval ppl")

    ru = evsub.add_parser("ruler", help="RULER-style synthetic tasks -> ruler.json + predictions.jsonl + ruler.png")
    ru.add_argument("--model", required=True, help="exported HF folder (or a training checkpoint)")
    ru.add_argument("--lengths", type=csv_list(int), default=[4096, 8192], help="prompt lengths in tokens, comma-separated")
    ru.add_argument("--tasks", type=csv_list(str), default=list(RULER_TASKS),
                    help=f"comma-separated, from {','.join(RULER_TASKS)} (default: all)")
    ru.add_argument("--samples", type=_positive_int, default=25, help="prompts per (task, length)")
    ru.add_argument("--output", required=True, help="output folder (an interrupted run resumes there)")
    ru.add_argument("--haystack", default=None, metavar="PATH",
                    help="real text for the niah/vt haystack: a prepared corpus (made with the model's tokenizer) "
                    "or .jsonl/.json/.parquet/.txt files (default: RULER's repeated noise sentences)")
    ru.add_argument("--seed", type=int, default=0, help="fixes every prompt")
    ru.add_argument("--prefill-chunk", type=_positive_int, default=4096, help="prompt tokens per model call")
    ru.add_argument("--batch-tokens", type=_positive_int, default=32768, help="prompts batched up to this many tokens")
    ru.set_defaults(command_name="eval ruler")

    ha = evsub.add_parser("harness", help="lm-evaluation-harness tasks (LongBench, RULER, MMLU, ...) through the "
                          "longcpt backend -> the harness's results and samples + results.json")
    ha.add_argument("--model", required=True, help="exported HF folder (or a training checkpoint)")
    ha.add_argument("--tasks", type=csv_list(str), required=True,
                    help="harness task or group names, comma-separated (e.g. longbench_hotpotqa,mmlu,hellaswag)")
    ha.add_argument("--include-path", default=None, metavar="DIR",
                    help="folder of task YAMLs added to the harness's (local data: dataset_path: json + data_files)")
    ha.add_argument("--limit", type=_positive_int, default=None, help="the first N documents of each task only")
    ha.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (default: the task's)")
    ha.add_argument("--output", required=True, help="output folder (an interrupted run resumes there)")
    ha.add_argument("--max-length", type=_positive_int, default=None,
                    help="longest input in tokens; longer ones lose tokens from the left (default: the model's "
                    "context length with its RoPE scaling; raise it for kinds that read past the window, e.g. infllm)")
    ha.add_argument("--gen-kwargs", type=_json_object, default=None, metavar="JSON",
                    help="generation settings replacing the tasks' own, e.g. '{\"max_gen_toks\": 64}'")
    ha.add_argument("--metadata", type=_json_object, default=None, metavar="JSON",
                    help="the harness's task metadata, e.g. '{\"max_seq_lengths\": [4096, 8192]}' for RULER "
                    "(the model's tokenizer is passed as \"tokenizer\")")
    ha.add_argument("--seed", type=int, default=0, help="few-shot draws and sampled generations")
    ha.add_argument("--prefill-chunk", type=_positive_int, default=4096, help="input tokens per model call")
    ha.add_argument("--batch-tokens", type=_positive_int, default=32768,
                    help="inputs of equal length batched up to this many tokens")
    ha.set_defaults(command_name="eval harness")
    for task in (pk, bs, ppl, ru, ha):
        add_model_arguments(task)

    namm = sub.add_parser("namm", help="Neural Attention Memory Models: evolve a KV-cache eviction policy")
    namm_sub = namm.add_subparsers(dest="namm_command", required=True, metavar="COMMAND")
    namm_train = namm_sub.add_parser("train", help="evolve a NAMM with CMA-ES for a frozen model (recipe section namm:)")
    namm_train.add_argument("recipe", help="recipe YAML with model.pretrained and a namm: section (see recipes/)")
    namm_train.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf overrides, e.g. namm.generations=10")
    namm_train.set_defaults(command_name="namm train")
    return parser


def add_model_arguments(task: argparse.ArgumentParser) -> None:
    """The flags every evaluation takes to decide how the model runs (recorded in its outputs)."""
    task.add_argument("--rope-scaling", type=_json_object, default=None, metavar="JSON",
                      help="replace the model's RoPE scaling at evaluation (training-free context extension), "
                      "e.g. '{\"rope_type\": \"dynamic\", \"factor\": 1.0}'; an exported folder only")
    task.add_argument("--attention", default=None, metavar="KIND",
                      help="attention kind to run the model with (default: the model's own; e.g. infllm, namm, "
                      "h2o, streaming for an inference-time memory on any softmax model)")
    task.add_argument("--attention-options", type=_json_object, default=None, metavar="JSON",
                      help="options of that kind by name, e.g. '{\"n_local\": 4096, \"topk\": 16}'")


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A moved recipe key is the user's to fix: one line, without the source location."""
    if issubclass(category, DeprecatedKeyWarning):
        print(f"longcpt: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command_name
    warnings.showwarning = _show_warning
    if name == "train" and early_signals.in_slurm_job():
        # Before the imports and the model build: SLURM's requeue signal would end the process.
        early_signals.record()
    try:
        try:
            module = importlib.import_module(COMMANDS[name])
        except ModuleNotFoundError as e:
            if e.name != COMMANDS[name]:
                raise
            raise LongcptError(f"`longcpt {name}` is not built yet in this version (see README, 'Not done yet')") from None
        return int(module.run(args) or 0)
    except LongcptError as e:
        print(f"longcpt {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longcpt {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
