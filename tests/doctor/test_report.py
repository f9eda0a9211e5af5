"""The doctor's report: rows, table, JSON, exit status; a check that raises is a FAIL row."""

import io
import json

import pytest

from longcpt.doctor.report import (
    FAIL,
    PASS,
    SKIP,
    Check,
    Result,
    exit_code,
    render_table,
    run_checks,
    to_json,
)


def test_a_raising_check_is_a_fail_row_and_the_next_check_runs():
    def broken():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    progress = io.StringIO()
    checks = [Check("kernels", "flash_attn bf16", broken),
              Check("training", "step", lambda: Result("training", "step", PASS, "ok"))]
    results = list(run_checks(checks, progress=progress))
    assert [r.status for r in results] == [FAIL, PASS]
    assert results[0].name == "flash_attn bf16" and "RuntimeError: CUDA error: no kernel image" in results[0].detail
    assert "[1/2] kernels: flash_attn bf16 ..." in progress.getvalue()  # progress as checks run
    assert "Traceback" in progress.getvalue()


def test_table_json_and_exit_status():
    rows = [Result("environment", "torch build vs hardware", FAIL, "torch 2.13.0+cpu is the CPU build but this "
                   "machine has 8 NVIDIA GPU(s): pip install ... " + "x" * 200, {"gpus": 8}),
            Result("environment", "SLURM", SKIP, "not inside a SLURM job"),
            Result("kernels", "sdpa bf16", PASS, "max error 1e-3")]
    table = render_table(rows, width=100)
    assert all(len(line) <= 100 for line in table.splitlines())
    assert "FAIL" in table and "x" * 30 in table and table.endswith("1 passed, 1 failed, 1 skipped")
    data = json.loads(to_json(rows, {"device": "cpu"}))
    assert data["ok"] is False and data["summary"] == {"pass": 1, "fail": 1, "skip": 1}
    assert data["results"][0]["data"] == {"gpus": 8} and data["meta"]["device"] == "cpu"
    assert exit_code(rows) == 1 and exit_code(rows[1:]) == 0


def test_unknown_status_is_refused():
    with pytest.raises(ValueError, match="WARN"):
        Result("x", "y", "WARN", "z")
