"""NAMM evolution fixtures: a tiny model folder and the `continue` task registered for it."""

from __future__ import annotations

import pytest
from namm_helpers import make_model_dir, register_continue_task

from longcpt.data.fitness import TASKS


@pytest.fixture(scope="session")
def namm_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("namm_model"))


@pytest.fixture
def continue_task(namm_model_dir, monkeypatch):
    monkeypatch.setitem(TASKS, "continue", None)
    register_continue_task(namm_model_dir)
    return namm_model_dir
