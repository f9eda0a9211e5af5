"""The stages of `make demo`, their sizes (`DemoPlan`), and the command line.

Every stage calls the project's own entry points: `longcpt.data` for the corpus, tokenizer,
prepared data and passkey prompts, `longcpt.lit.train.train` with the recipes in recipes/ for
the four training runs (which also export them), and `longcpt eval ppl` / `longcpt eval passkey`
(through `longcpt.cli.main`) for the evaluations. `longcpt.demo.summary` draws the figures and
writes the closing summary from what the run measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from longcpt.data.passkey import log_spaced_lengths
from longcpt.demo.stages import StageRunner
from longcpt.errors import LongcptError
from longcpt.fsio import record_settings

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "recipes"

# Training stage -> (recipe, run folder under the output folder), in the order they run; each
# starts from the export of the one before it.
TRAINING = {
    "pretrain": ("tiny_cpu.yaml", "pretrain"),
    "extend": ("tiny_cpu_extend.yaml", "extend"),
    "warmup": ("tiny_cpu_passkey_warmup.yaml", "passkey_warmup"),
    "finetune": ("tiny_cpu_passkey.yaml", "passkey_finetune"),
    "upto512": ("tiny_cpu_passkey_512.yaml", "passkey_512"),
    "upto2k": ("tiny_cpu_passkey_2k.yaml", "passkey_2k"),
}
# Passkey stage -> the prompt set it trains on (a key of `DemoPlan.passkey_sets`).
PASSKEY_SET = {"warmup": "short", "finetune": "short", "upto512": "upto512", "upto2k": "upto2k"}
LAST = list(TRAINING)[-1]  # the model the passkey sweep evaluates


@dataclass(frozen=True)
class DemoPlan:
    """How big each stage is. The training runs take their sizes from the recipes; `overrides`
    (stage -> `key=value` list) changes them, e.g. for the quick plan the tests run.

    Attributes:
        name: "full" (what `make demo` runs) or "quick".
        corpus_bytes: size of the demo corpus (`build_demo_corpus(max_bytes=...)`).
        vocab_size: BPE vocabulary.
        val_fraction: documents held out (validation loss, and the long ones for `eval ppl`).
        ppl_docs: held-out documents read by `eval ppl` (each at the extended window length).
        passkey_sets: the passkey fine-tuning prompts (random depths), name -> (lengths, prompts per
            length); `PASSKEY_SET` says which stage trains on which. Every prompt is seen once.
        passkey_lengths: the evaluation sweep, to twice the extended window.
        passkey_depths: needle depths of the sweep.
        passkey_trials: prompts per (length, depth).
        overrides: recipe overrides per training stage (keys of `TRAINING`).
    """

    name: str
    corpus_bytes: int = 6_000_000
    vocab_size: int = 2048
    val_fraction: float = 0.08
    ppl_docs: int = 8
    passkey_sets: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=lambda: {
        "short": (tuple(range(96, 129, 4)), 3000),
        "upto512": (log_spaced_lengths(96, 512, 16), 250),
        "upto2k": (log_spaced_lengths(96, 2048, 24), 110),
    })
    passkey_lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192)
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_trials: int = 4
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)


FULL = DemoPlan("full")

# The same stages shrunk to about a minute (the test suite runs it): a 300 KB corpus, 128-token
# pretraining windows extended to 512, a few steps each, except the short answer-only fine-tune:
# its 120 steps are enough for the answer loss to fall below what a model that does not read the
# key from the prompt can reach (the test checks it). The other figures it draws mean nothing.
_QUICK_COMMON = ("data.num_workers=0", "trainer.log_every_n_steps=1", "trainer.save_every_n_steps=100")
QUICK = DemoPlan(
    "quick",
    corpus_bytes=300_000,
    vocab_size=512,
    val_fraction=0.1,
    ppl_docs=2,
    passkey_sets={"short": ((160, 192), 1000),  # the 512-token BPE needs ~145 tokens for the fixed text
                  "upto512": ((160, 256), 4), "upto2k": ((160, 384), 4)},
    passkey_lengths=(192, 384),
    passkey_depths=(0.0, 1.0),
    passkey_trials=1,
    overrides={
        "pretrain": (*_QUICK_COMMON, "trainer.max_steps=4", "data.seq_len=128", "data.micro_batch_size=2",
                     "optim.warmup_steps=1", "trainer.val_every_n_steps=2", "data.val_batches=2"),
        "extend": (*_QUICK_COMMON, "trainer.max_steps=2", "data.seq_len=512", "optim.warmup_steps=1",
                   "trainer.val_every_n_steps=2", "data.val_batches=1"),
        "warmup": (*_QUICK_COMMON, "trainer.max_steps=2", "data.seq_len=200", "data.micro_batch_size=4",
                   "optim.warmup_steps=1"),
        "finetune": (*_QUICK_COMMON, "trainer.max_steps=120", "data.seq_len=200", "data.micro_batch_size=16",
                     "optim.warmup_steps=10", "trainer.save_every_n_steps=60"),
        "upto512": (*_QUICK_COMMON, "trainer.max_steps=2", "data.seq_len=264", "data.micro_batch_size=2",
                    "optim.warmup_steps=1"),
        "upto2k": (*_QUICK_COMMON, "trainer.max_steps=2", "data.seq_len=392", "data.micro_batch_size=1",
                   "optim.warmup_steps=1"),
    },
)
PLANS = {"full": FULL, "quick": QUICK}


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`STAGE.key=value` goes to that training stage, a plain `key=value` to all of them.

    Example: ["trainer.max_steps=50", "extend.optim.lr=5e-4"] ->
    {"pretrain": ["trainer.max_steps=50"], "extend": ["trainer.max_steps=50", "optim.lr=5e-4"], ...}
    """
    out: dict[str, list[str]] = {stage: [] for stage in TRAINING}
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in TRAINING and rest:
            out[head].append(rest)
        else:
            for stage in out:
                out[stage].append(item)
    return out


def use_all_cores() -> int:
    """Threads for this machine: every core the process may run on, unless OMP_NUM_THREADS says.

    Set before the first model is built; training and evaluation run in this process, so
    `torch.set_num_threads` is what counts (OMP_NUM_THREADS is passed on to anything spawned).
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = int(os.environ.get("OMP_NUM_THREADS") or cores)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader forks after tokenizing
    torch.set_num_threads(threads)
    return threads


class Demo:
    """The pipeline's paths and stages, over one output folder (see the package docstring)."""

    def __init__(self, output: Path, plan: DemoPlan = FULL, overrides: list[str] = ()):
        self.out = Path(output).resolve()
        self.plan = plan
        self.user_overrides = list(overrides)
        self.overrides = split_overrides(self.user_overrides)
        self.corpus = self.out / "corpus" / "corpus.jsonl"
        self.tokenizer = self.out / "tokenizer"
        self.data = self.out / "data"
        self.passkey_dir = self.out / "passkey_data"
        self.passkey_data = {name: self.passkey_dir / f"{name}.jsonl" for name in plan.passkey_sets}
        self.ppl_before = self.out / "ppl_before"
        self.ppl_after = self.out / "ppl_after"
        self.passkey = self.out / "passkey"

    training_stages = tuple(TRAINING)
    passkey_stages = tuple(PASSKEY_SET)

    def passkey_set(self, stage: str) -> tuple[tuple[int, ...], int]:
        """(prompt lengths, prompts per length) that passkey stage `stage` trains on."""
        return self.plan.passkey_sets[PASSKEY_SET[stage]]

    def loss_on(self, stage: str) -> str:
        """What passkey stage `stage` puts its loss on: "every token" (its recipe's
        `data.train_on_input`) or "the answer"."""
        return "every token" if self.config(stage, check_paths=False).data.train_on_input else "the answer"

    def run_dir(self, stage: str) -> Path:
        return self.out / TRAINING[stage][1]

    def config(self, stage: str, check_paths: bool = True):
        """The resolved recipe of a training stage: recipe, this folder's paths, plan, user overrides."""
        from longcpt.config import load_config

        stages = list(TRAINING)
        if stage == "pretrain":
            paths = [f"model.tokenizer={self.tokenizer}"]
        else:
            paths = [f"model.pretrained={self.run_dir(stages[stages.index(stage) - 1]) / 'hf'}"]
        if stage in PASSKEY_SET:
            paths.append(f"data.train={self.passkey_data[PASSKEY_SET[stage]]}")
        else:
            paths += [f"data.train={self.data / 'train'}", f"data.val={self.data / 'val'}"]
        overrides = [*paths, f"trainer.out_dir={self.run_dir(stage)}", "trainer.export_hf=true",
                     *self.plan.overrides.get(stage, ()), *self.overrides[stage]]
        return load_config(RECIPES / TRAINING[stage][0], overrides, check_paths=check_paths)

    # -- stages --------------------------------------------------------------------------------

    def check_settings(self, configs: dict) -> None:
        """Refuse to mix runs: the folder's first run recorded its plan, its overrides and a digest
        of each training stage's resolved recipe (`configs`, stage -> `config(stage)`), so that
        stages finished with other recipes (an older checkout of recipes/) are not continued with
        these."""
        from longcpt.config import to_yaml

        recipes = {stage: hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16] for stage, cfg in configs.items()}
        settings = {"plan": dataclasses.asdict(self.plan), "overrides": self.user_overrides, "recipes": recipes}
        record_settings(self.out / "demo.json", settings, self._conflict)

    def _conflict(self, before: dict, now: dict) -> str | None:
        """Any difference in the recorded settings, said by what it most likely is."""
        if before == now:
            return None
        fix = f"pass another --output (or delete {self.out}) to start a new one"
        if before.get("plan") == now["plan"] and before.get("overrides") == now["overrides"]:
            if "recipes" not in before:
                return (f"{self.out} holds a demo run of an older longcpt that did not record its recipes, "
                        f"so it cannot be continued safely; {fix}")
            changed = [stage for stage in TRAINING if before["recipes"].get(stage) != now["recipes"][stage]]
            return (f"{self.out} holds a demo run made with other recipes for {', '.join(changed)} "
                    f"(recipes/ changed since that run); {fix}")
        return (f"{self.out} holds a demo run with other settings (plan {before['plan']['name']!r}, "
                f"overrides {before['overrides']}); rerun with those, or {fix}")

    def build_corpus(self) -> dict:
        from longcpt.data import build_demo_corpus

        build_demo_corpus(self.corpus.parent, max_bytes=self.plan.corpus_bytes)
        with open(self.corpus) as f:
            docs = [json.loads(line) for line in f]
        return {"documents": len(docs), "bytes": sum(len(d["text"].encode()) for d in docs)}

    def build_tokenizer(self) -> dict:
        from longcpt.data import train_tokenizer

        train_tokenizer([self.corpus], self.plan.vocab_size, self.tokenizer)
        return {"vocab_size": self.plan.vocab_size}

    def prepare(self) -> dict:
        from longcpt.data import prepare_corpus

        report = prepare_corpus([self.corpus], self.tokenizer, self.data, val_fraction=self.plan.val_fraction)
        return {"splits": report["splits"]}

    def train(self, stage: str) -> dict:
        from longcpt.lit.train import train

        cfg = self.config(stage)
        result = train(cfg)
        if result.hf_dir is None:
            raise LongcptError(f"{stage}: training stopped before its last step (requeued); run the demo again")
        return {
            "steps": result.global_step,
            "hf": str(result.hf_dir),
            "seq_len": cfg.data.seq_len,
            "micro_batch_size": cfg.data.micro_batch_size,
            "rope_theta": _rope_theta(result.hf_dir),
        }

    def eval_ppl(self, model: Path, output: Path) -> dict:
        from longcpt.cli import main

        seq_len = self.config("extend", check_paths=False).data.seq_len
        code = main(["eval", "ppl", "--model", str(model), "--data", str(self.data / "val"), "--seq-len", str(seq_len),
                     "--bucket", str(seq_len // 8), "--max-docs", str(self.plan.ppl_docs), "--output", str(output)])
        if code != 0:
            raise LongcptError(f"perplexity evaluation of {model} failed (exit {code}); see the message above")
        return {"ppl": json.loads((output / "ppl.json").read_text())["ppl"]}

    def make_passkey_data(self) -> dict:
        from longcpt.data import load_tokenizer
        from longcpt.data.passkey import write_passkey_jsonl

        tokenizer = load_tokenizer(str(self.tokenizer))
        counts = {}
        for seed, (name, (lengths, n)) in enumerate(self.plan.passkey_sets.items(), start=1):
            counts[name] = write_passkey_jsonl(self.passkey_data[name], tokenizer, lengths, ["random"], n,
                                               seed=seed, split_digits=True)
        return {"examples": counts}

    def eval_passkey(self) -> dict:
        from longcpt.cli import main

        p = self.plan
        code = main(["eval", "passkey", "--model", str(self.run_dir(LAST) / "hf"), "--split-digits",
                     "--lengths", ",".join(map(str, p.passkey_lengths)),
                     "--depths", ",".join(map(str, p.passkey_depths)),
                     "--trials", str(p.passkey_trials), "--output", str(self.passkey)])
        if code != 0:
            raise LongcptError(f"passkey evaluation failed (exit {code}); see the message above")
        return {"by_length": json.loads((self.passkey / "passkey.json").read_text())["by_length"]}

    def _passkey_title(self, stage: str) -> str:
        """"passkey fine-tuning on 96-512-token prompts, loss on the answer (recipes/...)"."""
        lengths, _ = self.passkey_set(stage)
        loss = self.loss_on(stage)
        return (f"passkey {'warm-up' if loss == 'every token' else 'fine-tuning'} on {min(lengths):,}-"
                f"{max(lengths):,}-token prompts, loss on {loss} (recipes/{TRAINING[stage][0]})")

    def run(self, stop_after: str | None = None) -> tuple[StageRunner, Path | None]:
        """Run (or resume) every stage; returns the stage runner and the summary file (None when
        stopped early by `stop_after`)."""
        from longcpt.demo import summary

        # Every recipe problem before the first stage, not 5 minutes in.
        configs = {stage: self.config(stage, check_paths=False) for stage in TRAINING}
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_settings(configs)
        pre, ext = configs["pretrain"], configs["extend"]
        old, new = pre.data.seq_len, ext.data.seq_len
        theta_old = pre.rope.theta or pre.model.config.get("rope_theta", 10000.0)
        theta_new = ext.rope.theta or theta_old
        stages: list[tuple[str, str, object]] = [
            ("corpus", "demo corpus: the standard library's sources and docstrings", self.build_corpus),
            ("tokenizer", f"byte-level BPE tokenizer ({self.plan.vocab_size:,} tokens)", self.build_tokenizer),
            ("prepare", "prepare: tokenize into train / held-out data sets", self.prepare),
            ("pretrain", f"pretraining with AnchorAttention at {old:,} tokens "
                         f"(recipes/{TRAINING['pretrain'][0]})", lambda: self.train("pretrain")),
            ("ppl_before", f"perplexity by position at {new:,} tokens, before context extension",
             lambda: self.eval_ppl(self.run_dir("pretrain") / "hf", self.ppl_before)),
            ("extend", f"context extension to {new:,} tokens, rope_theta {theta_old:,.0f} -> "
                       f"{theta_new:,.0f} (recipes/{TRAINING['extend'][0]})", lambda: self.train("extend")),
            ("ppl_after", f"perplexity by position at {new:,} tokens, after context extension",
             lambda: self.eval_ppl(self.run_dir("extend") / "hf", self.ppl_after)),
            ("passkey_data", "passkey prompts for fine-tuning (key one digit per token)", self.make_passkey_data),
            *[(stage, self._passkey_title(stage), functools.partial(self.train, stage)) for stage in PASSKEY_SET],
            ("passkey_eval", "passkey evaluation: " + ", ".join(f"{n:,}" for n in self.plan.passkey_lengths)
             + " tokens", self.eval_passkey),
        ]
        if stop_after is not None and stop_after not in {name for name, _, _ in stages}:
            raise LongcptError(f"--stop-after {stop_after}: not a stage (one of {', '.join(n for n, _, _ in stages)})")
        runner = StageRunner(self.out, total=len(stages))
        for name, title, fn in stages:
            runner(name, title, fn)
            if name == stop_after:
                return runner, None
        return runner, summary.write_summary(self, runner)


def _rope_theta(hf_dir: Path) -> float | None:
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    return config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longcpt.demo",
        description="The whole pipeline on a CPU: corpus, tokenizer, pretraining, context extension, "
                    "passkey fine-tuning and evaluation, with figures and a summary.",
    )
    parser.add_argument("--output", default="demo", help="folder for every artifact (default: demo)")
    parser.add_argument("--quick", action="store_true",
                        help="a one-minute run of the same stages with a few steps and short lengths "
                             "(checks the installation; the figures mean nothing)")
    parser.add_argument("--stop-after", default=None, metavar="STAGE", help="stop after this stage (e.g. pretrain)")
    parser.add_argument("overrides", nargs="*", metavar="[STAGE.]key=value",
                        help="recipe overrides: plain ones apply to every training stage, "
                             f"{'./'.join(TRAINING)}. ones to that stage only "
                             "(e.g. extend.trainer.max_steps=20)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    threads = use_all_cores()
    print(f"longcpt demo: {threads} thread(s) on {os.cpu_count()} core(s); output {Path(args.output).resolve()}")
    demo = Demo(Path(args.output), QUICK if args.quick else FULL, args.overrides)
    try:
        runner, summary_path = demo.run(args.stop_after)
    except LongcptError as e:
        print(f"longcpt demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longcpt demo: interrupted; run the same command again to continue from the finished stages "
              f"(in {demo.out / 'stages'})", file=sys.stderr)
        return 130
    wall = time.perf_counter() - start
    if summary_path is None:
        print(f"stopped after stage {args.stop_after} ({wall / 60:.1f} min); run again without --stop-after to go on")
    else:
        print(f"demo finished in {wall / 60:.1f} min; this summary is also in {summary_path}")
    return 0
