"""The figures: passkey heatmap (x length, y depth), perplexity by position, loss curves, RULER
scores, NAMM fitness.

Figures are written atomically (temporary file in the same folder, then `os.replace`), like every
other output. matplotlib runs with the non-interactive Agg backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from longcpt.fsio import atomic_file

_MARK_STYLES = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)))  # one per vertical marker line


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure to `path` atomically and close it."""
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return Path(path)


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def passkey_heatmap(
    lengths: Sequence[int], depths: Sequence[float], accuracy: Sequence[Sequence[float]], title: str, path
) -> Path:
    """Accuracy heatmap: x = prompt length (tokens), y = needle depth, colour and text = accuracy.

    Args:
        lengths: column values.
        depths: row values.
        accuracy: accuracy[i][j] for depths[i] and lengths[j], in [0, 1].
        title: figure title.
        path: output PNG.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = ax.imshow(accuracy, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def ppl_plot(
    curves: Sequence[dict] | Mapping[str, Sequence[dict]], title: str, path, marks: Mapping[str, int] | None = None
) -> Path:
    """Perplexity per position bucket, drawn as steps over token positions (log y-axis).

    Args:
        curves: the `buckets` of one `ppl.json`, or {label: buckets} to compare models on the same
            documents (e.g. before and after context extension), one labelled curve each.
        title: figure title.
        path: output PNG.
        marks: {label: position} drawn as dashed vertical lines, e.g. {"trained length": 1024}.
    """
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    named = dict(curves) if isinstance(curves, Mapping) else {"": curves}
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, buckets in named.items():
        starts = [b["start"] for b in buckets] + [buckets[-1]["end"]]
        ax.stairs([b["ppl"] for b in buckets], starts, linewidth=2, label=label or None)
    for (label, position), style in zip((marks or {}).items(), _MARK_STYLES):
        ax.axvline(position, color="grey", linestyle=style, linewidth=1, label=label)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 300, not 3 x 10^2
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if any(named) or marks:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def loss_plot(
    stages: Sequence[tuple[str, Sequence[tuple[float, float]], Sequence[tuple[float, float]]]],
    title: str,
    path,
    marks: Mapping[str, float] | None = None,
) -> Path:
    """Training and validation loss of one or more runs: one colour per run.

    Args:
        stages: (label, training points, validation points) per run, points as (step, loss); the
            training loss is a thin line, the validation loss a line with markers.
        title: figure title.
        path: output PNG.
        marks: {label: step} drawn as dashed vertical lines (where a new training stage starts).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (label, train, val) in enumerate(stages):
        colour = f"C{i}"
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, ys, color=colour, linewidth=1, alpha=0.6, label=f"{label}: training")
        if val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, color=colour, linewidth=2, marker="o", markersize=4, label=f"{label}: validation")
    for (label, step), style in zip((marks or {}).items(), _MARK_STYLES):
        ax.axvline(step, color="grey", linestyle=style, linewidth=1, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def fitness_curve(history: Sequence[dict], title: str, path) -> Path:
    """NAMM evolution: population fitness on each generation's draw (mean, std band, best) and the
    reported policy's fitness on the validation draw, with the share of the KV cache it held through
    the prompts on a second axis.

    Args:
        history: one dict per generation with `generation`, `fitness_mean`, `fitness_std`,
            `fitness_best`, `validation_fitness` and `validation_kv_kept_mean`.
        title: figure title.
        path: output PNG.
    """
    plt = _pyplot()
    gens = [h["generation"] for h in history]
    mean = [h["fitness_mean"] for h in history]
    std = [h["fitness_std"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(gens, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                    color="tab:blue", label="population mean +- std")
    ax.plot(gens, mean, color="tab:blue", linewidth=1.5)
    ax.plot(gens, [h["fitness_best"] for h in history], color="tab:green", linewidth=1, label="population best")
    ax.plot(gens, [h["validation_fitness"] for h in history], color="black", marker=".", linewidth=1.5,
            label="CMA-ES mean on the validation prompts")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    ax.grid(True, alpha=0.3)
    kept = ax.twinx()
    kept.plot(gens, [h["validation_kv_kept_mean"] for h in history], color="tab:red", linestyle="--", linewidth=1,
              label="its cache through the prompts (kv_kept_mean)")
    kept.set_ylabel("share of the KV cache kept", color="tab:red")
    kept.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    more = kept.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def ruler_plot(lengths: Sequence[int], lines: dict[str, Sequence[float]], title: str, path) -> Path:
    """RULER scores (0-100) by prompt length, one line per task; a line named "average" is drawn bold.

    Args:
        lengths: x values (tokens), drawn on a log-2 axis.
        lines: name -> score at each length.
        title: figure title.
        path: output PNG.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, scores in lines.items():
        bold = name == "average"
        ax.plot(lengths, scores, marker="o", linewidth=2.5 if bold else 1.2, color="black" if bold else None,
                label=name, zorder=3 if bold else 2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [_length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-3, 103)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("score (string_match_all)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
