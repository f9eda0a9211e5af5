"""`longcpt` command line: train, plan, export, eval {passkey, booksum, ppl, ruler, harness, ...}, namm train,
doctor (docs/reference.md).

Each command is implemented by a `run(args)` function in its own module, imported only when the
command runs so that `--help` is instant. An evaluation's module also declares its flags
(`add_arguments(parser)`); `longcpt eval` lists the evaluations `longcpt.eval.EVALS` registers.
User errors (`LongcptError`) print one message and exit with status 2; argparse reports bad flags
the same way.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from longcpt import early_signals  # standard library only
from longcpt.argtypes import fraction, positive_float  # standard library only: --help stays instant
from longcpt.errors import DeprecatedKeyWarning, LongcptError
from longcpt.eval import EVALS  # the registry alone (standard library)

# command -> module providing run(args); `longcpt eval NAME` runs the module `EVALS` registers
COMMANDS = {
    "train": "longcpt.lit.train",
    "export": "longcpt.export.command",
    "namm train": "longcpt.namm.evolve",
    "doctor": "longcpt.doctor",
    "plan": "longcpt.plan.report",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `longcpt` parser for `argv` (default: the process's arguments).

    Each evaluation declares its own flags (`add_arguments(parser)` in its module, registered in
    `longcpt.eval.EVALS`); only the one `argv` asks for is imported, so `--help` stays instant.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
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
    plan.add_argument("--gpu-tflops", type=positive_float, default=None, metavar="TFLOPS",
                      help="dense peak TFLOP/s of one GPU (default: A100, 312 in bf16, 156 in 32-true)")
    plan.add_argument("--host-memory", default=None, metavar="SIZE",
                      help="host memory of one node: offload is suggested only where it fits (default: no limit; "
                      "the plan states the host memory offload needs)")
    plan.add_argument("--mfu", type=fraction, default=0.4,
                      help="assumed model FLOPs utilisation: model FLOPs only, recomputation excluded (default: 0.4)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(command_name="plan")

    export = sub.add_parser("export", help="Lightning .ckpt or DeepSpeed checkpoint -> Hugging Face folder")
    export.add_argument("checkpoint", help="a .ckpt file, a DeepSpeed checkpoint folder, or a run's out_dir")
    export.add_argument("--output", required=True, help="output HF folder (written atomically)")
    export.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="weight dtype (default: as trained)")
    export.add_argument("--tokenizer", default=None, help="tokenizer folder to copy (default: the run's)")
    export.add_argument("--adapter-only", action="store_true",
                        help="a LoRA run: write a peft adapter folder (adapters and the modules trained in full) "
                             "instead of merging the adapters into a whole model")
    export.add_argument("--base", default=None, metavar="DIR",
                        help="with --adapter-only: also write the frozen base model here, as the run used it "
                             "(needed when the run changed its RoPE settings), and point the adapter at it")
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

    ev = sub.add_parser("eval", help=f"evaluate an exported model: {', '.join(EVALS)}")
    evsub = ev.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, (module, help_text) in EVALS.items():
        task = evsub.add_parser(name, help=help_text, description=help_text)
        if argv[:2] == ["eval", name]:  # only the evaluation that runs brings its flags (and its imports)
            importlib.import_module(module).add_arguments(task)
        task.set_defaults(command_name=f"eval {name}", command_module=module)

    namm = sub.add_parser("namm", help="Neural Attention Memory Models: evolve a KV-cache eviction policy")
    namm_sub = namm.add_subparsers(dest="namm_command", required=True, metavar="COMMAND")
    namm_train = namm_sub.add_parser("train", help="evolve a NAMM with CMA-ES for a frozen model (recipe section namm:)")
    namm_train.add_argument("recipe", help="recipe YAML with model.pretrained and a namm: section (see recipes/)")
    namm_train.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf overrides, e.g. namm.generations=10")
    namm_train.set_defaults(command_name="namm train")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A moved recipe key is the user's to fix: one line, without the source location."""
    if issubclass(category, DeprecatedKeyWarning):
        print(f"longcpt: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    name = args.command_name
    warnings.showwarning = _show_warning
    if name == "train" and early_signals.in_slurm_job():
        # Before the imports and the model build: SLURM's requeue signal would end the process.
        early_signals.record()
    try:
        try:
            module = importlib.import_module(getattr(args, "command_module", None) or COMMANDS[name])
        except ModuleNotFoundError as e:
            if e.name != (getattr(args, "command_module", None) or COMMANDS[name]):
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
