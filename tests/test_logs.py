"""`trainer.loggers`: Lightning's CSV, TensorBoard, Weights & Biases and MLflow loggers in a real run,
offline (wandb in offline mode, MLflow's file store under the run folder), each holding the run's
metrics and its resolved recipe; a resumed run continues the same wandb and MLflow runs.

A tracker whose package is not installed is skipped with the reason (they are optional extras:
pip install -e '.[trackers]').
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "lit"))

from lit_helpers import SyntheticDataModule, read_metrics, tiny_overrides  # noqa: E402
from tiny import word_tokenizer  # noqa: E402

from longcpt.config import load_config  # noqa: E402
from longcpt.errors import ConfigError  # noqa: E402
from longcpt.lit.train import train  # noqa: E402
from longcpt.logs import IDS_FILE, LOGGERS, PACKAGES, logger_problems  # noqa: E402

INSTALLED = [name for name in LOGGERS if importlib.util.find_spec(PACKAGES.get(name, "lightning")) is not None]
MISSING = sorted(set(LOGGERS) - set(INSTALLED))


class KeepLoggers:
    """A Lightning callback keeping the Trainer's loggers (for the in-process wandb run's state)."""

    def __new__(cls):
        import lightning.pytorch as pl

        class Keep(pl.Callback):
            loggers: list = []

            def on_train_end(self, trainer, pl_module):
                self.loggers = list(trainer.loggers)

        return Keep()


@pytest.fixture
def tokenizer_dir(tmp_path):
    return word_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def offline(monkeypatch):
    """No tracker configuration from the environment: the defaults (offline) apply."""
    for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def launch(out, tokenizer_dir, steps):
    names = "[" + ",".join(INSTALLED) + "]"
    cfg = load_config(None, tiny_overrides(out, tokenizer_dir, trainer__max_steps=steps, trainer__loggers=names))
    keep = KeepLoggers()
    train(cfg, datamodule=SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size), callbacks=[keep])
    return keep.loggers


@pytest.mark.subprocess  # MLflow asks git for the source version
def test_every_installed_logger_gets_the_metrics_and_the_recipe_offline(tmp_path, tokenizer_dir, offline):
    if MISSING:
        print(f"not installed, so not tested here: {MISSING} (pip install -e '.[trackers]')")
    out = tmp_path / "run"
    loggers = launch(out, tokenizer_dir, 2)
    assert [type(lg).__name__ for lg in loggers][0] == "CSVLogger"
    losses = read_metrics(out)["train/loss"]
    assert sorted(losses) == [0, 1]
    hparams = yaml.safe_load(next((out / "logs" / "csv").glob("version_0/hparams.yaml")).read_text())
    assert hparams["trainer"]["max_steps"] == 2 and hparams["attention"]["kind"] == "full"

    if "tensorboard" in INSTALLED:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next((out / "logs" / "tensorboard").glob("version_0")))).Reload()
        steps = {e.step: e.value for e in events.Scalars("train/loss")}
        assert steps == pytest.approx(losses)
        assert any("hparams" in tag for tag in events.summary_metadata)  # the recipe, as TensorBoard's hparams

    if "wandb" in INSTALLED:
        import wandb

        run = next(lg for lg in loggers if type(lg).__name__ == "WandbLogger").experiment
        assert run.settings.mode in ("offline", "dryrun")  # wandb calls offline mode "dryrun" internally
        assert run.config["trainer"]["max_steps"] == 2 and run.config["model"]["tokenizer"] == str(tokenizer_dir)
        assert run.summary["train/loss"] == pytest.approx(losses[1])
        wandb.finish()
        assert list((out / "logs" / "wandb").glob(f"wandb/offline-run-*-{run.id}/run-{run.id}.wandb"))

    if "mlflow" in INSTALLED:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(out / "logs" / "mlflow").resolve().as_uri())
        run_id = yaml.safe_load((out / "logs" / IDS_FILE).read_text())["mlflow"]
        run = client.get_run(run_id)
        assert run.data.params["trainer/max_steps"] == "2" and run.data.params["attention/kind"] == "full"
        history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
        assert history == pytest.approx(losses)

    ids = yaml.safe_load((out / "logs" / IDS_FILE).read_text()) if (out / "logs" / IDS_FILE).exists() else {}
    launch(out, tokenizer_dir, 3)  # resumed: the same tracker runs go on
    if "mlflow" in INSTALLED:
        assert yaml.safe_load((out / "logs" / IDS_FILE).read_text())["mlflow"] == ids["mlflow"]
        assert sorted(m.step for m in client.get_metric_history(ids["mlflow"], "train/loss")) == [0, 1, 2]
    if "wandb" in INSTALLED:
        import wandb

        wandb.finish()
        assert len(list((out / "logs" / "wandb").glob(f"wandb/offline-run-*-{ids['wandb']}"))) >= 1
        assert yaml.safe_load((out / "logs" / IDS_FILE).read_text())["wandb"] == ids["wandb"]


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_each_tracker_is_skipped_cleanly_when_absent(name):
    """The test above runs what is installed; this says what is not, with the reason."""
    if importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"{PACKAGES[name]} is not installed (optional: pip install -e '.[trackers]')")
    assert logger_problems([name]) == []


def test_bad_logger_names_are_config_errors(monkeypatch):
    base = ["model.config={model_type: llama}", "model.tokenizer=t"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, "trainer.loggers=[csv,neptune,csv]"])
    assert "'neptune' is not a logger" in str(err.value) and "['csv'] listed more than once" in str(err.value)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="wandb needs the wandb package: pip install wandb"):
        load_config(None, [*base, "trainer.loggers=[csv,wandb]"])
    assert load_config(None, base).trainer.loggers == ["csv"]
