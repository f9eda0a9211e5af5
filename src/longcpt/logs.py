"""Metric loggers of a run: Lightning's own, chosen by `trainer.loggers`, all under `out_dir/logs`.

    trainer:
      loggers: [csv, tensorboard, wandb, mlflow]     # default [csv]

| name        | Lightning logger     | where it writes                         | offline by default        |
|-------------|----------------------|-----------------------------------------|---------------------------|
| csv         | CSVLogger            | logs/csv/version_N/metrics.csv          | (files only)              |
| tensorboard | TensorBoardLogger    | logs/tensorboard/version_N/             | (files only)              |
| wandb       | WandbLogger          | logs/wandb/ (an offline run)            | yes, unless WANDB_MODE is set |
| mlflow      | MLFlowLogger         | logs/mlflow/ (a file store)             | yes, unless MLFLOW_TRACKING_URI is set |

Weights & Biases runs offline (`wandb sync logs/wandb/offline-run-*` uploads one later) unless
the environment says otherwise (`WANDB_MODE=online`, with `WANDB_PROJECT`, default "longcpt"). MLflow
writes to a file store in the run folder unless `MLFLOW_TRACKING_URI` names a server (experiment
`MLFLOW_EXPERIMENT_NAME`, default "longcpt"); MLflow 3 keeps its file store in maintenance mode and
asks for `MLFLOW_ALLOW_FILE_STORE=true`, which is set for that store. A resumed run (same
`out_dir`) continues the same wandb and MLflow runs: their ids are kept in `logs/trackers.json`.
Every logger gets the run's resolved recipe as its hyperparameters (`log_recipe`).

`longcpt train` logs training metrics with them, `longcpt namm train` its per-generation fitness (CSV).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
# The package each logger needs beyond Lightning (checked before anything is built).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "trackers.json"


def logger_problems(names: list[str], key: str = "trainer.loggers") -> list[str]:
    """Unknown or repeated names, and trackers whose package is not installed, each with the fix."""
    problems = []
    for name in names:
        if name not in LOGGERS:
            problems.append(f"{key}: {name!r} is not a logger; choose among {', '.join(LOGGERS)}")
        elif name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
            problems.append(f"{key}: {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]} "
                            "(or pip install -e '.[trackers]' for all of them), or leave it out of the list")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"{key}: {repeated} listed more than once")
    return problems


def run_loggers(out: Path, names: list[str] | tuple[str, ...] = ("csv",), resume: bool = True,
                rank_zero: bool = True) -> list:
    """Lightning loggers for `names` under `out/logs` (the module docstring says where each writes).

    Args:
        out: the run folder.
        names: logger names (`LOGGERS`), checked by `logger_problems`.
        resume: continue the wandb / MLflow runs of an earlier launch (their ids in logs/trackers.json).
        rank_zero: this process records new run ids (the other ranks log nothing).

    Each launch writes a new CSV / TensorBoard version folder (`version_0`, `version_1` after a resume, ...).
    """
    logs = out / "logs"
    ids = _read_ids(logs) if resume else {}
    loggers = []
    for name in names:
        if name == "csv":
            from lightning.pytorch.loggers import CSVLogger

            loggers.append(CSVLogger(logs, name="csv"))
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(logs, name="tensorboard"))  # its HParams tab: the recipe
        elif name == "wandb":
            loggers.append(_wandb(logs, out.name, ids, rank_zero))
        elif name == "mlflow":
            loggers.append(_mlflow(logs, out.name, ids))
    return loggers


def _wandb(logs: Path, run_name: str, ids: dict[str, str], rank_zero: bool):
    from lightning.pytorch.loggers import WandbLogger

    run_id = ids.get("wandb") or uuid.uuid4().hex[:12]
    if rank_zero and _read_ids(logs).get("wandb") != run_id:
        _write_id(logs, "wandb", run_id)
    offline = os.environ.get("WANDB_MODE", "offline") == "offline"
    (logs / "wandb").mkdir(parents=True, exist_ok=True)
    return WandbLogger(name=run_name, project=os.environ.get("WANDB_PROJECT", "longcpt"), save_dir=str(logs / "wandb"),
                       offline=offline, id=run_id, resume="allow")


def _mlflow(logs: Path, run_name: str, ids: dict[str, str]):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store needs the opt-in
        uri = (logs / "mlflow").resolve().as_uri()
    return MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "longcpt"), run_name=run_name,
                        tracking_uri=uri, run_id=ids.get("mlflow"))


def log_recipe(loggers: list, cfg: Any, logs: Path, rank_zero: bool = True) -> None:
    """Give every logger the resolved recipe as hyperparameters (nested sections as the loggers flatten
    them: `trainer/max_steps` in MLflow and TensorBoard); record the MLflow run's id for a resume.

    MLflow keeps a parameter's first value: a resumed run whose recipe changed (a longer
    `trainer.max_steps`, say) logs only the keys its run does not have yet and names the others;
    the run folder's config.yaml is the latest launch's recipe.
    """
    params = dataclasses.asdict(cfg)
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger":
            _log_mlflow_params(logger, params, rank_zero)
            if rank_zero and _read_ids(logs).get("mlflow") != logger.run_id:
                _write_id(logs, "mlflow", logger.run_id)  # known once the run exists
        else:
            logger.log_hyperparams(params)


def _log_mlflow_params(logger, params: dict[str, Any], rank_zero: bool) -> None:
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

    if not rank_zero:
        return
    flat = _flatten_dict(_convert_params(params))
    logged = logger.experiment.get_run(logger.run_id).data.params
    changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != str(v))
    if changed:
        print(f"MLflow run {logger.run_id} keeps the first launch's {', '.join(changed)} (MLflow never changes a "
              "parameter); this launch's recipe is the run folder's config.yaml", flush=True)
    logger.log_hyperparams({k: v for k, v in flat.items() if k not in logged})


def _read_ids(logs: Path) -> dict[str, str]:
    file = logs / IDS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _write_id(logs: Path, name: str, run_id: str) -> None:
    from longcpt.fsio import atomic_write_text

    logs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(logs / IDS_FILE, json.dumps({**_read_ids(logs), name: run_id}, indent=2) + "\n")
