"""Rank 0 before the Trainer exists: only the launch's global rank 0 writes the run folder.

Lightning's multi-node launcher without SLURM starts `longcpt train` by hand on every node with
NODE_RANK set; the first process of a node has no LOCAL_RANK yet. Lightning's own
`rank_zero_only.rank` (RANK, LOCAL_RANK, SLURM_PROCID) calls each of them rank 0."""

import pytest
from lit_helpers import tiny_overrides

from longcpt.config import load_config
from longcpt.lit.train import _is_rank_zero, _prepare_run_dir

LAUNCH_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NAME")


@pytest.fixture
def launch(monkeypatch):
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)

    def set_env(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    return set_env


@pytest.mark.parametrize("env, zero", [
    ({}, True),
    ({"NODE_RANK": "0"}, True),
    ({"NODE_RANK": "1"}, False),  # another node's first process
    ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, False),
    ({"GROUP_RANK": "2", "LOCAL_RANK": "0"}, False),
    ({"RANK": "0", "NODE_RANK": "0"}, True),
    ({"RANK": "9", "LOCAL_RANK": "1", "NODE_RANK": "1"}, False),
])
def test_global_rank_zero_from_the_launch_environment(launch, env, zero):
    launch(**env)
    assert _is_rank_zero() is zero


def test_a_second_node_leaves_the_run_folder_alone(tmp_path, tokenizer_dir, launch):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    cfg = load_config(None, [*tiny_overrides(out, tokenizer_dir), "trainer.resume=false"])
    launch(NODE_RANK="1")
    _prepare_run_dir(cfg, str(tokenizer_dir))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # no config, no tokenizer, nothing moved
    launch(NODE_RANK="0")
    _prepare_run_dir(cfg, str(tokenizer_dir))
    names = sorted(p.name for p in out.iterdir())
    assert "config.yaml" in names and "tokenizer" in names and "checkpoints" not in names
    assert any(n.startswith("checkpoints.replaced-") for n in names)
