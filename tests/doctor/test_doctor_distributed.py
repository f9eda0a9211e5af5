"""The doctor's multi-process step on 2 CPU processes (gloo), the one multi-process run of these
tests: DeepSpeed ZeRO-3 in bf16 with a validation set that shards unevenly (5 windows on rank 0,
1 on rank 1). Every rank must run the same validation batches (else ZeRO-3 deadlocks: this run
would time out), the loss must equal the CPU float32 loss of the same batch, and the live
DeepSpeed engine must accumulate and reduce gradients in fp32."""

import pytest

from longcpt.doctor import steps

pytestmark = pytest.mark.slow


def test_zero3_step_on_two_cpu_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(steps, "TIMEOUT_S", {"cpu": 300, "cuda": 300})
    result = steps.check_step("deepspeed", 3, 2, "cpu", "bf16-mixed", "anchor", tmp_path)
    assert result.status == "PASS", result.detail
    ranks = result.data["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["global_step"] == 2 for r in ranks)
    assert ranks[0]["val_batches"] == ranks[1]["val_batches"] > 0
    assert all(r["deepspeed"] == {"model_dtype": "bfloat16", "grad_accum_dtype": "float32",
                                  "communication_data_type": "float32", "zero_stage": 3} for r in ranks)
