"""`longcpt namm train`: CMA-ES convergence, exact resume (also after kill -9), outputs, recipe checks."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cmaes import SepCMA

from longcpt.config import load_config as load_recipe
from longcpt.errors import ConfigError
from longcpt.model.attention.namm import load_policy
from longcpt.namm.config import NammRecipe
from longcpt.namm.evolve import ES_STATE, evolve_step, train

HERE = Path(__file__).resolve().parent


def load_config(recipe, overrides=(), **kw):
    """A `longcpt namm train` recipe: the training schema plus `namm:`."""
    return load_recipe(recipe, overrides, schema=NammRecipe, **kw)


def test_cma_es_converges_on_a_toy_fitness_with_known_optimum():
    """Maximise -|x - x*|^2 in 40 dimensions from 0 with the reference's population and sigma."""
    target = np.linspace(-0.3, 0.3, 40)
    es = SepCMA(mean=np.zeros(40), sigma=0.065, population_size=32, seed=0)

    def evaluate(xs):
        return [(-float(np.sum((x - target) ** 2)), None) for x in xs]

    for g in range(150):
        fitness, _, _ = evolve_step(es, 0, g, 32, evaluate)
    assert fitness[0] > -1e-6  # the mean (reported policy) sits on the optimum
    assert np.abs(es.mean - target).max() < 1e-3


def _recipe(tmp_path: Path, model_dir: Path, out: str, **namm) -> Path:
    settings = {"tasks": "[continue]", "update_every": 16, "population": 6, "workers": 1, "cache_weight": 0.5,
                "generations": 2, **namm}
    lines = [f"  {k}: {v}" for k, v in settings.items()]
    path = tmp_path / f"{out}.yaml"
    path.write_text(f"model:\n  pretrained: {model_dir}\ntrainer:\n  out_dir: {tmp_path / out}\nnamm:\n" + "\n".join(lines) + "\n")
    return path


def _state(tmp_path: Path, out: str) -> dict:
    with open(tmp_path / out / "namm" / ES_STATE, "rb") as f:
        return pickle.load(f)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker process runs: the same float reductions everywhere
    yield
    torch.set_num_threads(threads)


def test_resumed_evolution_equals_an_uninterrupted_run(tmp_path, continue_task, one_thread):
    model_dir = continue_task
    straight = train(load_config(_recipe(tmp_path, model_dir, "straight", generations=3)))
    assert straight.generations == 3
    train(load_config(_recipe(tmp_path, model_dir, "resumed", generations=1)))
    train(load_config(_recipe(tmp_path, model_dir, "resumed", generations=3)))
    a, b = _state(tmp_path, "straight"), _state(tmp_path, "resumed")
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in b["history"]]
    assert np.array_equal(a["optimizer"].mean, b["optimizer"].mean)
    policy = load_policy(tmp_path / "straight" / "namm" / "policy.pt")
    assert torch.equal(policy.params, load_policy(tmp_path / "resumed" / "namm" / "policy.pt").params)
    # outputs: the best-scoring mean so far, its feature statistics, the curve and the logs
    best = max(a["history"], key=lambda h: h["validation_fitness"])
    assert policy.info["fitness"] == best["validation_fitness"] and policy.info["kv_kept"] == best["validation_kv_kept"]
    # the zero policy is the full cache: ratio 1, minus 0.5 x the whole cache held through the prompts
    assert a["history"][0]["validation_fitness"] == pytest.approx(1.0 - 0.5)
    assert policy.feature_std.min() > 0 and policy.spec.update_every == 16
    assert (tmp_path / "straight" / "namm" / "fitness.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(next((tmp_path / "straight" / "namm" / "logs" / "csv").glob("*/metrics.csv")))))
    assert [float(r["namm/fitness_best"]) for r in rows] == [h["fitness_best"] for h in a["history"]]
    assert all(0 < float(r["namm/kv_kept_mean"]) <= 1 for r in rows)


@pytest.mark.slow
def test_kill_9_loses_nothing_and_resumes_exactly(tmp_path, continue_task, one_thread, subprocess_env):
    """Two worker processes; SIGKILL the whole run after generation 1, relaunch the same command."""
    model_dir = continue_task
    train(load_config(_recipe(tmp_path, model_dir, "reference", generations=3)))
    recipe = _recipe(tmp_path, model_dir, "killed", generations=3, workers=2)
    command = [sys.executable, str(HERE / "run_namm.py"), str(model_dir), str(recipe)]
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # printed once generation 1's state is saved
        if line.startswith("generation 1/"):
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, wherever they are
    proc.wait(timeout=60)
    proc.stdout.close()
    assert _state(tmp_path, "killed")["generation"] in (1, 2)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming after generation" in done.stdout
    a, b = _state(tmp_path, "reference"), _state(tmp_path, "killed")
    assert [h["validation_fitness"] for h in a["history"]] == [h["validation_fitness"] for h in b["history"]]
    assert np.array_equal(a["optimizer"].mean, b["optimizer"].mean)


def test_every_generation_draws_new_prompts_and_validation_chooses_the_policy(tmp_path, continue_task, one_thread,
                                                                              monkeypatch):
    from longcpt.data.fitness import TASKS, VALIDATION

    draws, build = [], TASKS["continue"]
    monkeypatch.setitem(TASKS, "continue", lambda namm, tok, draw: draws.append(draw) or build(namm, tok, draw))
    train(load_config(_recipe(tmp_path, continue_task, "draws", generations=3)))
    assert draws == [VALIDATION, 0, 1, 2]  # the validation draw once, then a fresh draw per generation
    history = _state(tmp_path, "draws")["history"]
    assert [h["generation"] for h in history] == [0, 1, 2] and all(h["train_examples"] > 0 for h in history)
    policy = load_policy(tmp_path / "draws" / "namm" / "policy.pt")
    best = max(history, key=lambda h: h["validation_fitness"])  # chosen on validation, not on the draws
    assert policy.info["generation"] == best["generation"] and policy.info["fitness"] == best["validation_fitness"]


def test_calibration_runs_where_the_trainer_would(monkeypatch):
    from longcpt.namm.evolve import namm_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert namm_device(load_config(None, ["model.pretrained=/x", "trainer.accelerator=auto"])) == "cuda:0"
    assert namm_device(load_config(None, ["model.pretrained=/x", "trainer.accelerator=gpu"])) == "cuda:0"
    assert namm_device(load_config(None, ["model.pretrained=/x", "trainer.accelerator=cpu"])) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert namm_device(load_config(None, ["model.pretrained=/x", "trainer.accelerator=auto"])) == "cpu"


def test_prompts_shorter_than_update_every_are_refused_naming_the_key():
    """They used to crash calibration with KeyError: 'namm_ema' (no update ever ran)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.pretrained=/x", "namm.passkey.lengths=[256,1024]", "namm.update_every=512"])
    text = str(e.value)
    assert "namm.passkey.lengths=[256, 1024]: [256] shorter than namm.update_every=512" in text
    load_config(None, ["model.pretrained=/x", "namm.passkey.lengths=[512]", "namm.update_every=512"])  # one eviction


def test_recipe_problems_are_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.pretrained=/x", "namm.update_every=40", "namm.scorer=bamm", "namm.tasks=[ruler]",
                           "namm.sigma=0", "namm.init=/nope.pt", "namm.selection=top"])
    text = str(e.value)
    assert "namm.update_every=40: must be a positive multiple of 16" in text
    assert "namm.scorer='bamm': must be one of bam, mlp; did you mean bam?" in text
    assert "namm.tasks='ruler': must be one of passkey" in text
    assert "namm.sigma=0" in text and "namm.init='/nope.pt': no such policy file" in text
    assert "namm.selection='top': must be one of reference, per_head" in text
