"""Read a run's CSV logs back: `out_dir/logs/csv/version_N/metrics.csv`, one version per launch.

    metrics = read_metrics("runs/tiny")       # {"train/loss": {9: 6.91, 19: 6.52, ...}, "val/loss": {...}}

Steps are Lightning's `step` column: the index of the optimizer step being taken (0 for the
first), so the value at step s was logged during optimizer step s + 1. A resumed run writes a
new version; where two launches logged the same step (a run killed after logging step s but
before checkpointing it), the later launch wins, as it is the one the weights continued from.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path


def _versions(out_dir: Path) -> list[Path]:
    folders = (out_dir / "logs" / "csv").glob("version_*")
    return sorted((p for p in folders if p.name.split("_")[1].isdigit()), key=lambda p: int(p.name.split("_")[1]))


def read_metrics(out_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """metric -> {step: value} over every launch's metrics.csv of a run (later launches win).

    Args:
        out_dir: the run folder (`trainer.out_dir`).

    Returns:
        Every logged metric (`train/loss`, `val/loss`, `train/tokens_per_s`, ...) by step; empty
        when the run has not logged yet.
    """
    found: dict[str, dict[int, float]] = {}
    for version in _versions(Path(out_dir)):
        path = version / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("step"):
                    continue
                step = int(row["step"])
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        found.setdefault(key, {})[step] = float(value)
    return found
