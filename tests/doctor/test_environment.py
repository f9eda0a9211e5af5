"""The environment verdicts with made-up machines: each failure names its fix."""

import pytest

from longcpt.doctor import environment as env
from longcpt.doctor.report import FAIL, PASS, SKIP


def test_cpu_wheel_on_a_gpu_machine_fails_with_the_install_command():
    status, why = env.torch_build_verdict("2.13.0+cpu", None, None, False, 8, None)
    assert status == FAIL and "CPU build" in why and "8 NVIDIA GPU" in why
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu" in why


@pytest.mark.parametrize("args, status, words", [
    (("2.13.0+cpu", None, None, False, 0, None), PASS, "without NVIDIA GPUs"),
    (("2.13.0+cu128", "12.8", None, True, 8, None), PASS, "sees the GPUs"),
    (("2.13.0+cu128", "12.8", None, False, 8, None), FAIL, "driver is older"),
    (("2.13.0+cu128", "12.8", None, False, 8, ""), SKIP, "CUDA_VISIBLE_DEVICES"),
    (("2.13.0+cu128", "12.8", None, False, 0, None), SKIP, "without NVIDIA GPUs"),
])
def test_torch_build_verdicts(args, status, words):
    got, why = env.torch_build_verdict(*args)
    assert got == status and words in why


def test_slurm_task_with_fewer_cores_than_asked_fails():
    job = {"SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "8"}
    assert env.slurm_verdict({}, 2)[0] == SKIP
    status, why = env.slurm_verdict({**job, "SLURM_STEP_ID": "0"}, cores=1)
    assert status == FAIL and "1 core(s) of the 8" in why and "SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in why
    assert env.slurm_verdict({**job, "SLURM_STEP_ID": "0"}, cores=8)[0] == PASS
    # In the batch script: srun would not pass --cpus-per-task on without SRUN_CPUS_PER_TASK.
    assert env.slurm_verdict(job, cores=8)[0] == FAIL
    assert env.slurm_verdict({**job, "SRUN_CPUS_PER_TASK": "8"}, cores=8)[0] == PASS


def test_deepspeed_ops_needed_by_the_recipe():
    ops = {"cpu_adam": (False, True), "async_io": (False, False), "fused_adam": (True, False)}
    assert env.deepspeed_ops_verdict(ops, ["cpu_adam"], ninja=True) == (PASS, "ops usable: cpu_adam, fused_adam")
    status, why = env.deepspeed_ops_verdict(ops, ["cpu_adam"], ninja=False)
    assert status == FAIL and "cpu_adam" in why and "pip install ninja" in why
    assert env.deepspeed_ops_verdict(ops, [], ninja=False)[0] == PASS


def test_disk_verdict(tmp_path):
    gib = env.GIB
    assert env.disk_verdict(10 * gib, None, tmp_path, None)[0] == PASS
    status, why = env.disk_verdict(100 * gib, 300 * gib, tmp_path, 2)
    assert status == FAIL and "keep_last_k" in why and "300.0 GiB" in why
    result = env.check_disk(str(tmp_path / "runs" / "new"), parameters=10**6, keep_last_k=2)
    assert result.status == PASS and result.data["needed_bytes"] == 10**6 * 16 * 3
