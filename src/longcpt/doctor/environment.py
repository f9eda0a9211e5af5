"""Environment checks: what is installed, what hardware torch sees, and whether they fit together.

Each `check_*` returns `Result`s; the pure `*_verdict` functions hold the decisions, so they are
unit-tested with made-up inputs (a CPU wheel on a GPU node, a Slurm task with one core, ...).
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from longcpt.doctor.report import FAIL, PASS, SKIP, Result

SECTION = "environment"
GIB = 1024**3
# Bytes per parameter a training checkpoint holds: fp32 master weights (4) and AdamW's two fp32
# moments (8), plus the 16-bit weights DeepSpeed also writes (2), rounded up.
CHECKPOINT_BYTES_PER_PARAM = 16
# The command that installs torch's CUDA build (PyTorch's own index; cu128 is one of its builds).
CUDA_TORCH_FIX = "pip install --force-reinstall torch=={version} --index-url https://download.pytorch.org/whl/cu128"


# ----------------------------------------------------------------------------------------------
# torch build and the GPUs it sees


def nvidia_gpus_present() -> int:
    """NVIDIA GPUs the kernel driver exposes, without asking torch (0 when none or no driver)."""
    found = glob.glob("/proc/driver/nvidia/gpus/*")
    if found:
        return len(found)
    devices = [d for d in glob.glob("/dev/nvidia*") if os.path.basename(d)[6:].isdigit()]
    if devices:
        return len(devices)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 0
        return sum(line.startswith("GPU ") for line in out.splitlines())
    return 0


def torch_build_verdict(torch_version: str, cuda_build: str | None, hip_build: str | None, cuda_available: bool,
                        gpus_present: int, visible_devices: str | None) -> tuple[str, str]:
    """PASS/FAIL and why, for the torch build against the GPUs the machine has.

    A CPU wheel on a GPU machine is the most common installation mistake: everything runs, on
    the CPU. A CUDA wheel that sees no GPU while the driver shows some means a driver older than
    the wheel's CUDA, or `CUDA_VISIBLE_DEVICES` hiding them.
    """
    if hip_build:
        return (PASS, f"ROCm build (HIP {hip_build}); GPUs available: {cuda_available}")
    if cuda_build is None:
        if gpus_present:
            base = torch_version.split("+")[0]
            return (FAIL, f"torch {torch_version} is the CPU build but this machine has {gpus_present} NVIDIA GPU(s): "
                          f"{CUDA_TORCH_FIX.format(version=base)} (pick the cuXY your driver supports)")
        return (PASS, f"CPU build of torch on a machine without NVIDIA GPUs ({torch_version})")
    if cuda_available:
        return (PASS, f"CUDA {cuda_build} build and torch sees the GPUs")
    if visible_devices is not None and visible_devices.strip() in ("", "-1", "none", "NoDevFiles"):
        return (SKIP, f"CUDA {cuda_build} build, but CUDA_VISIBLE_DEVICES={visible_devices!r} hides every GPU")
    if gpus_present:
        return (FAIL, f"CUDA {cuda_build} build but torch sees no GPU while the driver shows {gpus_present}: the "
                      "driver is older than this CUDA (see nvidia-smi's 'CUDA Version'); install a torch built for an "
                      "older CUDA or update the driver")
    return (SKIP, f"CUDA {cuda_build} build on a machine without NVIDIA GPUs (CPU runs only)")


def check_torch() -> list[Result]:
    cuda_build, hip_build = torch.version.cuda, getattr(torch.version, "hip", None)
    available = torch.cuda.is_available()
    data = {"torch": torch.__version__, "python": platform.python_version(), "cuda": cuda_build, "hip": hip_build,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "nccl": None, "cuda_available": available}
    if available and torch.distributed.is_nccl_available():
        try:
            version = torch.cuda.nccl.version()  # (major, minor, patch[, suffix]); an int before torch 1.10
            data["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (RuntimeError, AttributeError):
            pass
    versions = f"torch {torch.__version__}, python {data['python']}"
    if cuda_build:
        versions += f", CUDA {cuda_build}, cuDNN {data['cudnn']}, NCCL {data['nccl']}"
    gpus = nvidia_gpus_present()
    status, why = torch_build_verdict(torch.__version__, cuda_build, hip_build, available, gpus,
                                      os.environ.get("CUDA_VISIBLE_DEVICES"))
    data["nvidia_gpus_present"] = gpus
    return [Result(SECTION, "versions", PASS, versions, data),
            Result(SECTION, "torch build vs hardware", status, why, {"nvidia_gpus_present": gpus})]


def check_gpus(precision: str | None) -> Result:
    """Every visible GPU with its memory and compute capability; bf16 needs Ampere (sm80) or newer."""
    if not torch.cuda.is_available():
        return Result(SECTION, "GPUs", SKIP, "no CUDA GPU visible")
    gpus, problems = [], []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cap = (p.major, p.minor)
        gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / GIB, 1), "capability": cap})
        if precision and precision.startswith("bf16") and cap < (8, 0):
            problems.append(f"GPU {i} {p.name} (sm{p.major}{p.minor}) has no bf16")
    names = sorted({f"{g['name']} {g['memory_gib']} GiB sm{g['capability'][0]}{g['capability'][1]}" for g in gpus})
    line = f"{len(gpus)} x " + "; ".join(names)
    if problems:
        return Result(SECTION, "GPUs", FAIL, "; ".join(problems) + f" but trainer.precision={precision}: use "
                      "trainer.precision=32-true (or fp16-capable hardware)", {"gpus": gpus})
    note = "" if all(g["capability"] >= (8, 0) for g in gpus) else " (flash-attn/varlen need sm80+: flex is used)"
    return Result(SECTION, "GPUs", PASS, line + note, {"gpus": gpus})


# ----------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_ops_verdict(ops: dict[str, tuple[bool, bool]], needed: list[str], ninja: bool) -> tuple[str, str]:
    """PASS/FAIL for DeepSpeed's C++/CUDA ops: `ops` maps name -> (installed, compatible).

    An op that is not pre-installed is JIT-compiled on first use, which needs ninja and a
    compatible system (compiler, CUDA toolkit matching torch's); `needed` are the ops the recipe
    will use.
    """
    usable = sorted(n for n, (installed, compatible) in ops.items() if installed or (compatible and ninja))
    missing = [n for n in needed if n not in usable]
    line = f"ops usable: {', '.join(usable) or 'none'}"
    if missing:
        why = "" if ninja else " (ninja is missing: pip install ninja)"
        return (FAIL, f"op(s) {', '.join(missing)} needed by the recipe cannot be built here{why}; " + line)
    return (PASS, line)


def check_deepspeed(strategy: str | None, offload_optimizer: bool) -> Result:
    """`ds_report`'s op table through DeepSpeed's Python API, judged against what the recipe uses."""
    try:
        import deepspeed
    except ImportError as e:
        status = FAIL if strategy == "deepspeed" else SKIP
        return Result(SECTION, "DeepSpeed", status, f"not importable ({e})" +
                      (": pip install deepspeed" if status == FAIL else ""))
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS
    from deepspeed.ops.op_builder.builder import probe_is_compatible
    from torch.utils.cpp_extension import is_ninja_available

    ops = {name: (bool(installed_ops.get(name, False)), bool(probe_is_compatible(builder)))
           for name, builder in ALL_OPS.items()}
    needed = ["cpu_adam"] if (strategy == "deepspeed" and offload_optimizer) else []
    ninja = is_ninja_available()
    status, line = deepspeed_ops_verdict(ops, needed, ninja)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()._name
    return Result(SECTION, "DeepSpeed", status, f"{deepspeed.__version__} ({accelerator} accelerator), {line}",
                  {"version": deepspeed.__version__, "accelerator": accelerator, "ninja": ninja,
                   "ops": {k: {"installed": i, "compatible": c} for k, (i, c) in ops.items()}})


# ----------------------------------------------------------------------------------------------
# SLURM


SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK",
              "SRUN_CPUS_PER_TASK", "SLURM_GPUS_ON_NODE", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_JOB_NAME")


def slurm_verdict(env: dict[str, str], cores: int) -> tuple[str, str]:
    """PASS/FAIL/SKIP for the SLURM environment, given this process's usable cores.

    Since Slurm 22.05, srun does not take `--cpus-per-task` from sbatch: without
    `SRUN_CPUS_PER_TASK` (or `srun --cpus-per-task`) every task gets one core, and the DataLoader
    workers of each GPU share it.
    """
    if "SLURM_JOB_ID" not in env:
        return (SKIP, "not inside a SLURM job")
    shown = ", ".join(f"{k}={env[k]}" for k in SLURM_KEYS if k in env)
    asked = env.get("SLURM_CPUS_PER_TASK")
    fix = "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK before srun (slurm/train.sbatch does)"
    if asked and asked.isdigit():
        if "SLURM_STEP_ID" in env and cores < int(asked):
            return (FAIL, f"this srun task has {cores} core(s) of the {asked} asked with --cpus-per-task: {fix}")
        if "SLURM_STEP_ID" not in env and env.get("SRUN_CPUS_PER_TASK") != asked:
            return (FAIL, f"SRUN_CPUS_PER_TASK={env.get('SRUN_CPUS_PER_TASK')!r} but --cpus-per-task={asked}: srun "
                          f"(Slurm >= 22.05) would give each task one core; {fix}")
    return (PASS, shown)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_slurm() -> Result:
    env = {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "SRUN_"))}
    cores = usable_cores()
    status, line = slurm_verdict(env, cores)
    return Result(SECTION, "SLURM", status, line, {k: env[k] for k in SLURM_KEYS if k in env} | {"cores": cores})


# ----------------------------------------------------------------------------------------------
# Disk


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_verdict(free: int, needed: int | None, where: Path, keep: int | None) -> tuple[str, str]:
    line = f"{free / GIB:,.1f} GiB free at {where}"
    if needed is None:
        return (PASS, line)
    line += f"; checkpoints need about {needed / GIB:,.1f} GiB ({keep} kept + 1 being written)"
    if free < needed:
        return (FAIL, line + ": put trainer.out_dir on a larger filesystem or lower trainer.keep_last_k")
    return (PASS, line)


def check_disk(out_dir: str, parameters: int | None, keep_last_k: int | None) -> Result:
    """Free space where the run writes, against the checkpoints it will keep (when the model is known)."""
    where = existing_parent(Path(out_dir))
    if not os.access(where, os.W_OK):
        return Result(SECTION, "disk", FAIL, f"{where} (first existing parent of trainer.out_dir={out_dir}) is not "
                      "writable: choose another trainer.out_dir")
    free = shutil.disk_usage(where).free
    needed = None
    if parameters is not None and keep_last_k is not None:
        needed = parameters * CHECKPOINT_BYTES_PER_PARAM * (keep_last_k + 1)
    status, line = disk_verdict(free, needed, where, keep_last_k)
    return Result(SECTION, "disk", status, line, {"free_bytes": free, "needed_bytes": needed, "path": str(where)})
