"""`python -m longcpt.demo --output demo` (what `make demo` runs): the whole pipeline on one CPU.

    demo corpus (the standard library's sources and docstrings)
      -> BPE tokenizer -> prepared train/val data sets
      -> continual pretraining of a tiny Llama with AnchorAttention (recipes/tiny_cpu.yaml)
      -> Hugging Face export -> passkey evaluation -> every artifact's path

Budget: at most 15 minutes on 2 cores including setup; the recipe is sized so the
training takes a few minutes. Extra `key=value` arguments override the recipe (e.g.
`trainer.max_steps=50` for a quicker look). Re-running resumes or reuses finished stages.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import time
from pathlib import Path

from longcpt.errors import LongcptError

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"
VOCAB_SIZE = 2048
PASSKEY = {"lengths": "256,512,1024", "depths": "0,0.5,1", "trials": "2"}


_STAGES: list[tuple[str, float]] = []  # (stage, start time) for the closing summary


def _say(text: str) -> None:
    from rich.console import Console

    _STAGES.append((text, time.perf_counter()))
    Console().rule(f"[bold]{text}")


def _tokens_per_s(run: Path) -> float | None:
    """Mean of the logged training tokens/s over the latest launch of the run."""
    versions = sorted((run / "logs" / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        return None
    with open(versions[-1] / "metrics.csv") as f:
        values = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    return sum(values) / len(values) if values else None


def run_demo(output: Path, recipe: Path, overrides: list[str]) -> dict[str, Path]:
    """Run every stage into `output`; returns the artifacts by name.

    Raises:
        LongcptError: a stage failed (its message says which and why).
    """
    from longcpt.config import load_config
    from longcpt.data import build_demo_corpus, prepare_corpus, train_tokenizer
    from longcpt.lit.train import train

    output.mkdir(parents=True, exist_ok=True)
    art: dict[str, Path] = {}

    _say("1/5 demo corpus: the standard library's sources and docstrings")
    art["corpus"] = output / "corpus" / "corpus.jsonl"
    if not art["corpus"].is_file():
        build_demo_corpus(output / "corpus")

    _say(f"2/5 byte-level BPE tokenizer ({VOCAB_SIZE} tokens)")
    art["tokenizer"] = output / "tokenizer"
    if not (art["tokenizer"] / "tokenizer.json").is_file():
        train_tokenizer([art["corpus"]], VOCAB_SIZE, art["tokenizer"])

    _say("3/5 prepare: tokenize into train/val data sets")
    art["data"] = output / "data"
    if not (art["data"] / "report.json").is_file():
        prepare_corpus([art["corpus"]], art["tokenizer"], art["data"], val_fraction=0.02)

    _say(f"4/5 continual pretraining: {recipe.name} (AnchorAttention), then Hugging Face export")
    run = output / "run"
    cfg = load_config(recipe, [
        f"model.tokenizer={art['tokenizer']}",
        f"data.train={art['data'] / 'train'}",
        f"data.val={art['data'] / 'val'}",
        f"trainer.out_dir={run}",
        "trainer.export_hf=true",
        *overrides,
    ], check_paths=True)
    result = train(cfg)
    art["run"] = run
    art["config"] = run / "config.yaml"
    art["checkpoint"] = run / "checkpoints" / "last"
    art["metrics"] = sorted((run / "logs" / "csv").glob("version_*/metrics.csv"))[-1]
    if result.hf_dir is None:  # resumed a finished run: export its last checkpoint again
        from longcpt.export.convert import export_checkpoint

        export_checkpoint(art["checkpoint"], run / "hf")
    art["hf"] = run / "hf"

    _say("5/5 passkey evaluation of the exported model")
    if importlib.util.find_spec("longcpt.eval.passkey") is None:
        print("`longcpt eval passkey` is not part of this build: skipped")
    else:
        from longcpt.cli import main

        art["passkey"] = output / "passkey"
        code = main(["eval", "passkey", "--model", str(art["hf"]), "--lengths", PASSKEY["lengths"],
                     "--depths", PASSKEY["depths"], "--trials", PASSKEY["trials"], "--output", str(art["passkey"])])
        if code != 0:
            raise LongcptError(f"passkey evaluation failed (exit {code}); see the message above")
    return art


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longcpt.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="demo", help="folder for every artifact (default: demo)")
    parser.add_argument("--recipe", default=str(RECIPE), help="training recipe (default: recipes/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        art = run_demo(Path(args.output).resolve(), Path(args.recipe), args.overrides)
    except LongcptError as e:
        print(f"longcpt demo: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    _say("artifacts")
    for (stage, t0), (_, t1) in zip(_STAGES, _STAGES[1:]):
        print(f"  {t1 - t0:6.0f}s  {stage}")
    for name, path in art.items():
        print(f"  {name:<11} {path}")
    for extra in ("passkey.json", "passkey.png"):
        if "passkey" in art and (art["passkey"] / extra).is_file():
            print(f"  {'':<11} {art['passkey'] / extra}")
    speed = _tokens_per_s(art["run"])
    print(f"demo finished in {wall / 60:.1f} min; training throughput {speed:,.0f} tokens/s" if speed else
          f"demo finished in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
