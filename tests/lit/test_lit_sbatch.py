"""slurm/*.sbatch: thin, sectioned, one srun line; run with a stub `srun` to see what they launch,
what they refuse before launching anything, and what they do with a SIGUSR1 sent to the batch shell.
(tests/slurm/ runs them under a real SLURM.)"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = ["train.sbatch", "convert.sbatch", "data_prep.sbatch"]
ARGS = {"train.sbatch": ["recipes/x.yaml"], "convert.sbatch": ["a", "b"], "data_prep.sbatch": ["tok", "data", "a.jsonl"]}
JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2"}

pytestmark = pytest.mark.subprocess  # the scripts run under bash


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


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_log_folder_exists_in_a_fresh_clone(name):
    """SLURM opens `--output` before the script runs: with no logs/ the job dies with no output at
    all (only slurmd's log says why), so the folder is part of the repository."""
    (output,) = [x.split("=", 1)[1] for x in directives(SLURM / name) if x.startswith("--output=")]
    folder = Path(output).parent
    tracked = subprocess.run(["git", "ls-files", str(folder)], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert f"{folder}/.gitignore" in tracked.stdout.split(), f"{folder}/ is not in the repository"
    assert (REPO / folder / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]


def test_data_prep_defaults_fit_a_common_node():
    """An sbatch request larger than every node is accepted and then pends forever with no error:
    the defaults are modest (the header says how to scale them), not 32 CPUs and 64 GB."""
    d = directives(SLURM / "data_prep.sbatch")
    cpus = [int(x.split("=")[1]) for x in d if x.startswith("--cpus-per-task=")]
    mem = [x.split("=")[1] for x in d if x.startswith("--mem=")]
    assert cpus == [8] and mem == ["16G"]
    text = (SLURM / "data_prep.sbatch").read_text()
    assert "8 CPUs, 16 GB" in text and "PENDING forever" in text


def fake_job(tmp_path: Path, srun_body: str) -> tuple[Path, dict[str, str]]:
    """A venv whose activate puts stub `srun` and `longcpt` commands on PATH; the stub srun records
    its arguments, the cores it was given and its inherited SIGUSR1 disposition, then runs `srun_body`."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    (venv / "bin" / "longcpt").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "srun").write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" > {tmp_path / "srun.args"}\n'
        f'echo "${{SRUN_CPUS_PER_TASK:-unset}}" > {tmp_path / "srun.cpus"}\n'
        f"grep '^SigIgn' /proc/$$/status > {tmp_path / 'srun.ignored'}\n" + srun_body)
    for stub in ("longcpt", "srun"):
        (venv / "bin" / stub).chmod(0o755)
    return venv, {**os.environ, "LONGCPT_VENV": str(venv)}


def run_script(tmp_path, script, args, env, srun_body="exit 0\n"):
    _, full = fake_job(tmp_path, srun_body)
    return subprocess.run(["bash", str(SLURM / script), *args], env={**full, **env}, capture_output=True,
                          text=True, cwd=tmp_path)


def launched(tmp_path, script, args, env) -> list[str]:
    result = run_script(tmp_path, script, args, env)
    assert result.returncode == 0, result.stderr
    return (tmp_path / "srun.args").read_text().splitlines()


def test_train_launches_one_task_per_gpu_with_the_recipe(tmp_path):
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "6",
           "SLURM_GPUS_ON_NODE": "8"}
    args = launched(tmp_path, "train.sbatch", ["recipes/x.yaml", "strategy.name=deepspeed"], env)
    assert args == ["--kill-on-bad-exit=1", "longcpt", "train", "recipes/x.yaml", "trainer.num_nodes=4",
                    "trainer.devices=8", "strategy.name=deepspeed"]


def test_train_takes_the_ranks_from_the_job(tmp_path):
    """`--ntasks=2` without --ntasks-per-node: two ranks on one node, whatever the recipe says."""
    args = launched(tmp_path, "train.sbatch", ["recipes/x.yaml"], JOB)
    assert args[3:6] == ["recipes/x.yaml", "trainer.num_nodes=1", "trainer.devices=2"]


@pytest.mark.parametrize("env, overrides, expected", [
    ({"SLURM_NTASKS_PER_NODE": "8"}, [], "--ntasks-per-node=2 instead of --ntasks"),
    ({"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "3"}, [], "3 tasks do not split evenly over 2 nodes"),
    ({"SLURM_GPUS_ON_NODE": "4"}, [], "one task per GPU: the job has 4 GPU(s) and 2 task(s) per node"),
    ({}, ["trainer.devices=4"], "trainer.devices=4: the ranks come from the job (here 1 node(s) x 2 task(s))"),
])
def test_train_refuses_ranks_that_do_not_match_the_job(tmp_path, env, overrides, expected):
    """One message before anything starts (a job with --ntasks=2 kept the default 8 tasks per node
    and recorded `devices: 8` while two ranks ran)."""
    result = run_script(tmp_path, "train.sbatch", ["recipes/x.yaml", *overrides], {**JOB, **env})
    assert result.returncode == 2 and not (tmp_path / "srun.args").exists()
    assert result.stderr.count("error:") == 1 and expected in result.stderr, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_environment_fails_at_once_with_the_fix(tmp_path, script):
    """Neither LONGCPT_VENV nor ./.venv: the job used to skip activation silently and fail later in
    srun with `execve(): longcpt: No such file or directory`."""
    _, env = fake_job(tmp_path, "exit 0\n")
    env = {**env, **JOB, "LONGCPT_VENV": str(tmp_path / "missing")}
    result = subprocess.run(["bash", str(SLURM / script), *ARGS[script]], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "srun.args").exists()
    assert f"{tmp_path / 'missing'}/bin/activate does not exist" in result.stderr
    assert "Export LONGCPT_VENV=/path/to/venv before sbatch" in result.stderr
    env.pop("LONGCPT_VENV")  # and no ./.venv in the submit folder either
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run(["bash", str(SLURM / script), *ARGS[script]], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2 and ".venv/bin/activate does not exist" in result.stderr, result.stderr


def test_convert_and_data_prep_arguments(tmp_path):
    args = launched(tmp_path, "convert.sbatch", ["runs/a", "out/hf", "--dtype", "bf16"], {})
    assert args == ["longcpt", "export", "runs/a", "--output", "out/hf", "--dtype", "bf16"]
    prep = tmp_path / "prep"  # the data_prep script runs data_prep/prepare_corpus.py of the submit folder
    prep.mkdir()
    (prep / "data_prep").mkdir()
    (prep / "data_prep" / "prepare_corpus.py").touch()
    args = launched(prep, "data_prep.sbatch", ["tok", "data", "a.jsonl", "b/*.txt", "--", "--val-fraction", "0.01"],
                    {"SLURM_CPUS_PER_TASK": "32"})
    assert args == ["python", "data_prep/prepare_corpus.py", "--input", "a.jsonl", "b/*.txt", "--tokenizer", "tok",
                    "--output", "data", "--num-proc", "32", "--val-fraction", "0.01"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_srun_tasks_get_the_cpus_per_task_of_the_job(tmp_path, script):
    """Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch; SRUN_CPUS_PER_TASK passes it."""
    (tmp_path / "data_prep").mkdir()
    (tmp_path / "data_prep" / "prepare_corpus.py").touch()
    launched(tmp_path, script, ARGS[script], {**JOB, "SLURM_CPUS_PER_TASK": "6"})
    assert (tmp_path / "srun.cpus").read_text().strip() == "6"


def wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_sigusr1_to_the_batch_shell_reaches_the_tasks(tmp_path):
    """`scancel --batch --signal=USR1` (or --full, or --signal=B:USR1@...) signals the batch shell:
    untrapped, bash died of it (`died by signal: 10`) and the job failed without a requeue. The
    script passes it to srun (which forwards it to the tasks) and ends with srun's status; srun
    starts with SIGUSR1 not ignored (an ignore would be inherited by the ranks)."""
    srun_body = (f"trap 'echo got USR1 > {tmp_path / 'srun.usr1'}; exit 0' USR1\n"
                 f"touch {tmp_path / 'srun.ready'}\n"
                 "for i in $(seq 200); do sleep 0.1; done\nexit 7\n")
    _, env = fake_job(tmp_path, srun_body)
    proc = subprocess.Popen(["bash", str(SLURM / "train.sbatch"), "recipes/x.yaml"], env={**env, **JOB},
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "srun.ready")
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, (proc.returncode, stderr)
    assert (tmp_path / "srun.usr1").read_text() == "got USR1\n"
    assert "batch shell: SIGUSR1 passed on to the training tasks" in stderr
    ignored = int((tmp_path / "srun.ignored").read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGUSR1 - 1)), "srun inherited an ignored SIGUSR1"


def test_the_batch_shell_ends_with_the_status_of_srun(tmp_path):
    result = run_script(tmp_path, "train.sbatch", ["recipes/x.yaml"], JOB, srun_body="exit 5\n")
    assert result.returncode == 5, result.stderr
