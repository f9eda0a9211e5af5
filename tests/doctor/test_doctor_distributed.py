"""The doctor's multi-process step on 2 CPU processes (gloo), the one multi-process run of these
tests: DeepSpeed ZeRO-3 in bf16 with a validation set that shards unevenly (5 windows on rank 0,
1 on rank 1), on the path of a recipe with sequence parallelism, a pretrained model (loaded into
the partitions inside `deepspeed.zero.Init`), activation checkpointing and a CUDA-only backend.
Every rank must run the same validation batches (else ZeRO-3 deadlocks: this run would time out),
the loss must equal the CPU float32 loss of the same batch, the leak probe must find every other
document's logits bit-equal on each rank's half of the window, and the live ZeRO optimizer must
accumulate and reduce gradients in fp32."""

import pytest

from longcpt.doctor import steps

pytestmark = pytest.mark.slow


def test_zero3_step_on_two_cpu_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(steps, "TIMEOUT_S", {"cpu": 300, "cuda": 300})
    path = steps.RecipePath(options={"backend": "flash_attn"}, checkpointing=True, strategy="deepspeed", stage=3,
                            sequence_parallel=4, pretrained=True)
    result = steps.check_step("deepspeed", 3, 2, "cpu", "bf16-mixed", "anchor", tmp_path, path)
    assert result.status == "PASS", result.detail
    assert result.data["from_recipe"] == ["backend flash_attn is CUDA-only: auto here", "activation checkpointing",
                                          "sequence parallel 2 (the recipe's 4)",
                                          "pretrained weights loaded into ZeRO-3 partitions"]
    ranks = result.data["ranks"]
    assert all(r["leak"]["ok"] and r["leak"]["stayed"] == 0 and r["leak"]["tokens"] == 2 * 32 for r in ranks)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["global_step"] == 2 for r in ranks)
    assert ranks[0]["val_batches"] == ranks[1]["val_batches"] > 0
    assert all(r["deepspeed"] == {"model_dtype": "bfloat16", "grad_accum_dtype": "float32",
                                  "communication_data_type": "float32", "zero_stage": 3} for r in ranks)
