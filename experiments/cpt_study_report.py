"""Tables and figures of the CPU continual-pretraining study (docs/cpt_study.md) from its outputs.

    python experiments/cpt_study_report.py WORK_DIR OUT_DIR [FIGURES_DIR]

Reads WORK_DIR/eval_{base,ARM_sSEED}/{ppl/ppl.json,ruler/ruler.json} as `experiments/cpt_study.sh` writes
them and writes FIGURES_DIR/cpt_study_ppl.png (perplexity by position, mean over seeds, the band
between the seeds), FIGURES_DIR/cpt_study_ruler.png (RULER average and per task by length, same) and
OUT_DIR/cpt_study.json (every number of the tables), and prints the markdown tables. FIGURES_DIR
defaults to OUT_DIR (the study writes its figures into docs/, which shows them).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from longcpt.eval.figures import save_figure
from longcpt.fsio import atomic_write_json

ARMS = ("full", "intra_doc", "anchor", "infini")


def load(work: Path) -> dict:
    """{name: {"ppl": ppl.json, "ruler": ruler.json}} for the base and every ARM_sSEED evaluated."""
    runs = {}
    for folder in sorted(work.glob("eval_*")):
        name = folder.name.removeprefix("eval_")
        ppl, ruler = folder / "ppl" / "ppl.json", folder / "ruler" / "ruler.json"
        if ppl.is_file() and ruler.is_file():
            runs[name] = {"ppl": json.loads(ppl.read_text()), "ruler": json.loads(ruler.read_text())}
    return runs


def by_arm(runs: dict) -> dict[str, list[dict]]:
    """{"base": [run], "full": [seed 0 run, seed 1 run], ...}."""
    arms: dict[str, list[dict]] = {}
    for name, run in runs.items():
        match = re.fullmatch(r"(.+)_s(\d+)", name)
        arms.setdefault(match.group(1) if match else name, []).append(run)
    return arms


def ppl_range(run: dict, lo: int, hi: int) -> float:
    """Token-weighted perplexity over the buckets inside [lo, hi)."""
    import math

    buckets = [b for b in run["ppl"]["buckets"] if b["start"] >= lo and b["end"] <= hi]
    tokens = sum(b["tokens"] for b in buckets)
    return math.exp(sum(math.log(b["ppl"]) * b["tokens"] for b in buckets) / tokens)


def ruler_score(run: dict, length: int, task: str | None = None) -> float:
    if task is None:
        return run["ruler"]["average"][str(length)]
    return next(r["score"] for r in run["ruler"]["results"] if r["task"] == task and r["length"] == length)


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with two seeds, mean +- half-range spans both."""
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2


def fmt(values: list[float], digits: int = 1) -> str:
    mean, half = spread(values)
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if len(values) > 1 else "")


def main(argv: list[str]) -> int:
    work, out = Path(argv[0]), Path(argv[1])
    figures = Path(argv[2]) if len(argv) > 2 else out
    runs = load(work)
    arms = by_arm(runs)
    order = [a for a in ("base", *ARMS) if a in arms]
    any_run = next(iter(runs.values()))
    lengths = any_run["ruler"]["lengths"]
    tasks = any_run["ruler"]["tasks"]
    seq_len = any_run["ppl"]["seq_len"]
    base_len, cpt_len = lengths[0], lengths[-1]
    spans = [(0, base_len), (base_len, cpt_len), (cpt_len, seq_len)]

    table = {arm: {"seeds": len(arms[arm]),
                   "ppl": {f"{lo}-{hi}": [ppl_range(r, lo, hi) for r in arms[arm]] for lo, hi in spans},
                   "ruler_average": {str(n): [ruler_score(r, n) for r in arms[arm]] for n in lengths},
                   "ruler": {t: {str(n): [ruler_score(r, n, t) for r in arms[arm]] for n in lengths} for t in tasks}}
             for arm in order}
    atomic_write_json(out / "cpt_study.json", table)

    print("| model | seeds | " + " | ".join(f"ppl {lo}-{hi}" for lo, hi in spans) + " | "
          + " | ".join(f"RULER {n}" for n in lengths) + " |")
    print("|---|---:|" + "---:|" * (len(spans) + len(lengths)))
    for arm in order:
        row = table[arm]
        print(f"| {arm} | {row['seeds']} | " + " | ".join(fmt(row["ppl"][f"{lo}-{hi}"], 2) for lo, hi in spans)
              + " | " + " | ".join(fmt(row["ruler_average"][str(n)]) for n in lengths) + " |")
    print()
    print("| model | task | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|---|" + "---:|" * len(lengths))
    for arm in order:
        for t in tasks:
            print(f"| {arm} | {t} | " + " | ".join(fmt(table[arm]["ruler"][t][str(n)]) for n in lengths) + " |")

    plot_ppl(arms, order, base_len, cpt_len, figures / "cpt_study_ppl.png")
    plot_ruler(table, order, lengths, tasks, figures / "cpt_study_ruler.png")
    print(f"wrote {out / 'cpt_study.json'}, {figures / 'cpt_study_ppl.png'}, {figures / 'cpt_study_ruler.png'}")
    return 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(arms: dict, order: list[str], base_len: int, cpt_len: int, path: Path) -> None:
    """Left: perplexity by position (mean over seeds, band between them). Right: the same relative to
    the base model, bucket by bucket, which removes what the held-out documents themselves make easy
    or hard at each position."""
    plt = _pyplot()
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(12, 4))
    base = [b["ppl"] for b in arms["base"][0]["ppl"]["buckets"]] if "base" in arms else None
    for arm in order:
        runs = arms[arm]
        buckets = runs[0]["ppl"]["buckets"]
        x = [(b["start"] + b["end"]) / 2 for b in buckets]
        values = [[r["ppl"]["buckets"][i]["ppl"] for r in runs] for i in range(len(buckets))]
        style = {"color": "black", "linestyle": "--"} if arm == "base" else {}
        for axis, scale in ((ax, [1.0] * len(x)), (rel, base)):
            if scale is None:
                continue
            mean = [sum(v) / len(v) / s for v, s in zip(values, scale)]
            line, = axis.plot(x, mean, marker=".", label=f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})",
                              **style)
            if len(runs) > 1:
                axis.fill_between(x, [min(v) / s for v, s in zip(values, scale)],
                                  [max(v) / s for v, s in zip(values, scale)], alpha=0.2, color=line.get_color())
    for axis in (ax, rel):
        for n, label in ((base_len, "base context"), (cpt_len, "CPT context")):
            axis.axvline(n, color="grey", linewidth=0.8, linestyle=":")
            axis.text(n, axis.get_ylim()[1], f" {label}", fontsize=7, va="top", color="grey")
        axis.set_xlabel("token position (bucket centre)")
        axis.grid(True, alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (held-out documents)")
    ax.legend(fontsize=8)
    ax.set_title("Perplexity by position: base (512-token windows) and the CPT arms (4K)", fontsize=9)
    rel.set_ylabel("perplexity / base perplexity")
    rel.set_title("Relative to the base model, bucket by bucket", fontsize=9)
    save_figure(fig, path)


def plot_ruler(table: dict, order: list[str], lengths: list[int], tasks: list[str], path: Path) -> None:
    plt = _pyplot()
    panels = ["average", *tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2), sharey=True)
    for ax, panel in zip(axes, panels):
        for arm in order:
            scores = table[arm]["ruler_average"] if panel == "average" else table[arm]["ruler"][panel]
            values = [scores[str(n)] for n in lengths]  # per length: one score per seed
            mean = [sum(v) / len(v) for v in values]
            line, = ax.plot(lengths, mean, marker="o", label=arm, color="black" if arm == "base" else None,
                            linestyle="--" if arm == "base" else "-")
            if len(values[0]) > 1:
                ax.fill_between(lengths, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                                color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("prompt tokens", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("score (string_match_all)")
    axes[0].set_ylim(-3, 103)
    axes[-1].legend(fontsize=7, loc="upper right")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
