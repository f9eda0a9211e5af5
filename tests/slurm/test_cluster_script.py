"""tests/slurm/cluster.sh where it cannot start SLURM: it says why and succeeds (part of `make test`)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parent / "cluster.sh"

pytestmark = pytest.mark.subprocess  # cluster.sh runs under bash


def run_with(tmp_path: Path, uid: int, tools: list[str]) -> subprocess.CompletedProcess:
    """cluster.sh with a PATH holding only `tools` (the real ones) and an `id` answering `uid`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text(f'#!/bin/sh\ncase "$1" in -u) echo {uid} ;; *) echo tester ;; esac\n')
    (bin_dir / "id").chmod(0o755)
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return subprocess.run([shutil.which("bash"), str(CLUSTER), "run", "false"], capture_output=True, text=True,
                          env={**os.environ, "PATH": str(bin_dir)}, timeout=60)


def test_not_root_is_skipped_with_the_reason(tmp_path):
    result = run_with(tmp_path, 1000, ["uname"])
    assert result.returncode == 0 and "SKIPPED: slurmd must run as root" in result.stderr, result.stderr


def test_no_slurm_and_no_apt_get_is_skipped_with_the_reason(tmp_path):
    result = run_with(tmp_path, 0, ["uname"])
    assert result.returncode == 0, result.stderr
    assert "SKIPPED: SLURM is not installed and there is no apt-get to install slurmctld slurmd" in result.stderr


def test_usage():
    result = subprocess.run(["bash", str(CLUSTER)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
