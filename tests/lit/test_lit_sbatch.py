"""slurm/*.sbatch: thin, sectioned, one srun line; run with a stub `srun` to see what they launch."""

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[2] / "slurm"
SCRIPTS = ["train.sbatch", "convert.sbatch", "data_prep.sbatch"]


def directives(script: Path) -> list[str]:
    return [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_sectioned_with_one_srun_line(name):
    text = (SLURM / name).read_text()
    positions = [text.index(f"# {'-' * 64} {section}") for section in ("SBATCH", "env", "launch")]
    assert positions == sorted(positions)
    assert len([line for line in text.splitlines() if line.startswith("srun ")]) == 1
    assert subprocess.run(["bash", "-n", str(SLURM / name)]).returncode == 0


def test_train_requeues_on_usr1_before_the_limit():
    """The lead time covers a step plus a checkpoint save of a large model (the script says how to
    size it): two minutes is less than saving ~110 GB of ZeRO-3 checkpoint at 300 MB/s - 1 GB/s."""
    d = directives(SLURM / "train.sbatch")
    lead = [int(m.group(1)) for x in d if (m := re.fullmatch(r"--signal=USR1@(\d+)", x))]
    assert lead and lead[0] >= 600 and "--requeue" in d
    assert "SECONDS >= 1.5 x (step time + save time) + 60" in (SLURM / "train.sbatch").read_text()
    assert any(re.fullmatch(r"--output=logs/%x-%j\.out", x) for x in d)


def run_with_stub_srun(tmp_path, script, args, env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "srun"
    stub.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path / "srun.args"}\n'
                    f'echo "${{SRUN_CPUS_PER_TASK:-unset}}" > {tmp_path / "srun.cpus"}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LONGCPT_VENV": str(tmp_path / "none"), **env}
    result = subprocess.run(["bash", str(SLURM / script), *args], env=full, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return (tmp_path / "srun.args").read_text().splitlines()


def test_train_launches_one_task_per_gpu_with_the_recipe(tmp_path):
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "6"}
    args = run_with_stub_srun(tmp_path, "train.sbatch", ["recipes/x.yaml", "strategy.name=deepspeed"], env)
    assert args == ["--kill-on-bad-exit=1", "longcpt", "train", "recipes/x.yaml", "trainer.accelerator=gpu",
                    "trainer.num_nodes=4", "trainer.devices=8", "strategy.name=deepspeed"]


def test_convert_and_data_prep_arguments(tmp_path):
    args = run_with_stub_srun(tmp_path, "convert.sbatch", ["runs/a", "out/hf", "--dtype", "bf16"], {})
    assert args == ["longcpt", "export", "runs/a", "--output", "out/hf", "--dtype", "bf16"]
    (tmp_path / "bin").rename(tmp_path / "bin0")
    args = run_with_stub_srun(tmp_path, "data_prep.sbatch", ["tok", "data", "a.jsonl", "b/*.txt", "--",
                                                               "--val-fraction", "0.01"], {"SLURM_CPUS_PER_TASK": "32"})
    assert args == ["python", "data_prep/prepare_corpus.py", "--input", "a.jsonl", "b/*.txt", "--tokenizer", "tok",
                    "--output", "data", "--num-proc", "32", "--val-fraction", "0.01"]


@pytest.mark.parametrize("script, args", [("train.sbatch", ["recipes/x.yaml"]), ("convert.sbatch", ["a", "b"]),
                                          ("data_prep.sbatch", ["tok", "data", "a.jsonl"])])
def test_srun_tasks_get_the_cpus_per_task_of_the_job(tmp_path, script, args):
    """Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch; SRUN_CPUS_PER_TASK passes it."""
    env = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "6"}
    run_with_stub_srun(tmp_path, script, args, env)
    assert (tmp_path / "srun.cpus").read_text().strip() == "6"
