"""Metric loggers of a run: the same CSV (and TensorBoard, when installed) logs for every command.

`longcpt train` logs training metrics with them, `longcpt namm train` its per-generation fitness.
"""

from __future__ import annotations

from pathlib import Path


def run_loggers(out: Path) -> list:
    """Lightning's CSVLogger (and TensorBoardLogger when tensorboard is installed) under `out/logs`.

    Each launch writes a new version folder (`logs/csv/version_0`, `version_1` after a resume, ...).
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(out / "logs", name="csv")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        loggers.append(TensorBoardLogger(out / "logs", name="tensorboard"))
    return loggers
