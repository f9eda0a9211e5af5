# Two commands set up a fresh machine on their own (README, "Setup"):
#   make demo   - venv, CPU torch, the project, then the embedded end-to-end run
#   make test   - the same setup plus the test tools, then the test suite (.ci/run calls it)
#   make test-fast - the unit tests only (no subprocess, no multi-process, no end-to-end run): the inner loop
#   make test-slurm - slurm/*.sbatch under a real one-node SLURM (.ci/run calls it after make test)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# TORCH_STAMP: the venv with CPU torch; STAMP: the project and what it runs with (all `make demo`
# needs); DEV_STAMP: the project with its `dev` extra, the test and lint tools (pytest, ruff,
# lm-eval), in one install run.
TORCH_STAMP := $(VENV)/.torch-installed
STAMP       := $(VENV)/.longcpt-installed
DEV_STAMP   := $(VENV)/.longcpt-dev-installed
# The CPU build of torch goes in first so that no CUDA build is pulled by accident. `+cpu` pins the
# CPU wheel: a local wheel cache (pip's find-links) serves it when present, else PyTorch's CPU index.
TORCH_SPEC      ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The project and its dependencies go in with uv (installed into the venv next to torch): 24 s for
# the dev extra on the 2-core machine against pip's 61 s, byte-compiled on both cores. Where uv
# cannot be had, pip does the same install.
INSTALL = $(VENV)/bin/uv pip install --python $(PY) --compile-bytecode $(1) \
	  || $(PY) -m pip install $(1)

# Tests run on every core, a test file per worker at a time (pytest-xdist; tests/suite.py orders the
# files). PYTEST_ARGS adds flags: .ci/run passes --budget (fail past test_budget_seconds, pyproject.toml).
TEST_WORKERS ?= auto
XDIST        := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
PYTEST_ARGS  ?=

.PHONY: setup demo test test-fast test-slurm lint bench clean

setup: $(DEV_STAMP)

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)" \
	  || $(PY) -m pip install "$(TORCH_SPEC)" --index-url $(TORCH_CPU_INDEX)
	-$(PY) -m pip install -q uv
	touch $(TORCH_STAMP)

$(STAMP): $(TORCH_STAMP) pyproject.toml
	$(call INSTALL,-e .)
	touch $(STAMP)

# One install run for the project and its `dev` extra (a second one resolved and rebuilt the project).
$(DEV_STAMP): $(TORCH_STAMP) pyproject.toml
	$(call INSTALL,-e ".[dev]")
	touch $(STAMP) $(DEV_STAMP)

demo: $(STAMP)
	$(PY) -m longcpt.demo --output demo

test: $(DEV_STAMP)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q --fast $(XDIST) $(PYTEST_ARGS)

# tests/slurm/cluster.sh installs slurmctld, slurmd and munge with apt-get when missing (as root),
# starts a private one-node cluster, runs the `slurm` tests against it and stops it; where it cannot
# (not root, no apt-get) it says why and skips. -rP prints each test's job timeline.
test-slurm: $(DEV_STAMP)
	tests/slurm/cluster.sh run $(PY) -m pytest -q -rP -m slurm tests/slurm

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks data_prep

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) demo .pytest_cache
