"""The real-SLURM tests (marker `slurm`) run only inside `make test-slurm`, which starts a one-node
cluster (tests/slurm/cluster.sh) and sets LONGCPT_SLURM_CLUSTER; elsewhere they are skipped."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lit"))


@pytest.fixture(autouse=True)
def _needs_a_cluster(request):
    if request.node.get_closest_marker("slurm") and not os.environ.get("LONGCPT_SLURM_CLUSTER"):
        pytest.skip("needs a SLURM cluster: `make test-slurm` starts one (tests/slurm/cluster.sh)")
