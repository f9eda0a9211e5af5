"""`longcpt doctor --quick` on this CPU machine: runs its CPU subset, prints the table, exits 0."""

import json
import subprocess
import sys

import pytest

from longcpt.doctor import steps

pytestmark = pytest.mark.slow


def test_doctor_quick_json_on_cpu(subprocess_env):
    result = subprocess.run(
        [sys.executable, "-m", "longcpt", "doctor", "--quick", "--json", "--recipe", "recipes/tiny_cpu.yaml",
         "trainer.precision=bf16-mixed", "data.seq_len=256", "data.micro_batch_size=1"],
        capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)  # stdout holds the JSON alone (training lines went to stderr)
    rows = {r["name"]: r for r in report["results"]}
    assert report["ok"] and report["summary"]["fail"] == 0
    assert rows["torch build vs hardware"]["status"] == "PASS"
    for name in ("sdpa bf16", "sdpa fp16", "flex bf16", "intra_doc sdpa", "anchor sdpa", "infini memory bf16",
                 "step single device", "throughput"):
        assert rows[name]["status"] == "PASS", rows[name]
    assert rows["sdpa bf16"]["data"]["errors"]["gqa"]["dq"] < rows["sdpa bf16"]["data"]["tolerance"]
    step = rows["step single device"]["data"]["ranks"][0]
    assert abs(step["loss"] - step["reference_loss"]) / step["reference_loss"] <= steps.LOSS_TOLERANCE["bf16-mixed"]
    assert rows["throughput"]["data"]["tokens_per_s"] > 0
    assert rows["step ddp / deepspeed x2"]["status"] == "SKIP"
    assert "[1/" in result.stderr  # progress while it runs
