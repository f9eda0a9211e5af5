"""`longcpt doctor [--recipe RECIPE.yaml] [--json] [--quick]`: does every path work on this machine?

The first command to run on a new machine or cluster (docs/doctor.md). It checks, in order:

  environment  torch/CUDA/cuDNN/NCCL versions; a CPU wheel on a GPU machine (with the fix); GPUs
               with memory and compute capability; flash-attn (does it *load*), torch varlen and
               FlexAttention; DeepSpeed's ops (its `ds_report` table, through its Python API);
               SLURM variables and the cores srun really gave; free disk at trainer.out_dir
  kernels      what every trainable attention kind declares (its `doctor` hook): the document
               kernels of the device, forward and backward in bf16 and fp16 at a few shapes (GQA,
               1-token documents) against a dense reference; each kind through a tiny model; the
               Infini memory under bf16 autocast
  training     a real `longcpt train` step on the recipe's path (its strategy on one device; DDP
               and DeepSpeed ZeRO-2/3 on 2 GPUs, or 2 CPU processes over gloo without --quick; the
               recipe's backend, checkpointing, offload, sequence parallelism and pretrained
               loading) whose loss must equal the CPU float32 loss of the same batch and whose
               live model must keep documents apart (the leak probe, `longcpt.doctor.leak`); then
               tokens/s and MFU of the recipe's model

and prints a PASS/FAIL/SKIP table with one line of why per check (`--json`: the same as JSON, for
CI). The exit status is 1 when anything failed. Progress goes to stderr as each check runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from longcpt.doctor.report import Check, Result, exit_code, render_table, run_checks, to_json


def build_checks(cfg, device, quick: bool, scratch: Path, peak: float | None = None) -> list[Check]:
    """The checks for this machine, in the order they run (see the module docstring)."""
    import torch

    from longcpt.config import Config
    from longcpt.doctor import environment as env
    from longcpt.doctor import kernels, steps

    precision = cfg.trainer.precision if cfg is not None else ("bf16-mixed" if _bf16_ok(device) else "32-true")
    kind = cfg.attention.kind if cfg is not None else Config().attention.kind  # the recipes' default kind
    strategy = cfg.strategy if cfg is not None else None
    kind_checks = kernels.kind_checks(device, quick, cfg.attention.options if cfg is not None else None, precision)
    checks = [
        Check(env.SECTION, "torch", env.check_torch),
        Check(env.SECTION, "GPUs", lambda: env.check_gpus(precision)),
        *(c for c in kind_checks if c.section == env.SECTION),
        Check(env.SECTION, "DeepSpeed", lambda: env.check_deepspeed(
            strategy.name if strategy else None, bool(strategy and strategy.offload_optimizer))),
        Check(env.SECTION, "SLURM", env.check_slurm),
        Check(env.SECTION, "disk", lambda: _check_disk(cfg)),
        *(c for c in kind_checks if c.section != env.SECTION),
    ]
    if cfg is not None and cfg.model.fused_kernels != "none":
        checks.append(Check(kernels.SECTION, f"fused kernels ({cfg.model.fused_kernels})",
                            lambda: _check_fused(device, cfg.model.fused_kernels)))
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    path = steps.RecipePath.of(cfg)

    def step(name: str, stage: int, devices: int):
        return lambda: steps.check_step(name, stage, devices, accelerator, precision, kind, scratch, path)

    # Two devices for the multi-process checks: 2 GPUs, or 2 CPU processes over gloo (not with --quick).
    devices = torch.cuda.device_count() if device.type == "cuda" else (1 if quick else 2)
    runs, skipped = steps.step_plan(path, devices, _deepspeed_importable())
    for name, stage, n in runs:
        zero = f" ZeRO-{stage}" if name == "deepspeed" else ""
        label = "step single device" if n == 1 else f"step {name}{zero} x{n}"
        checks.append(Check(steps.SECTION, label, step(name, stage, n)))
    if devices < 2:
        why = "--quick" if device.type != "cuda" else f"{devices} GPU(s) visible"
        checks.append(Check(steps.SECTION, "multi-process steps", lambda: Result(
            steps.SECTION, "step ddp / deepspeed x2", "SKIP", f"skipped: {why}")))
    for reason in skipped:
        checks.append(Check(steps.SECTION, "sequence parallel", lambda reason=reason: Result(
            steps.SECTION, "step sequence parallel", "SKIP", f"skipped: {reason}")))
    checks.append(Check(steps.SECTION, "throughput", lambda: steps.check_throughput(cfg, device, quick, peak)))
    return checks


def _check_fused(device, name: str) -> Result:
    """`model.fused_kernels` against the eager model (`longcpt.model.fused.check`)."""
    from longcpt.doctor import kernels
    from longcpt.model import fused

    status, detail = fused.check(device)
    return Result(kernels.SECTION, f"fused kernels ({name})", status, detail)


def _bf16_ok(device) -> bool:
    import torch

    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def _deepspeed_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _check_disk(cfg) -> Result:
    from longcpt.doctor import environment as env
    from longcpt.model.recipe import model_args
    from longcpt.plan.shape import ModelShape

    if cfg is None:
        return env.check_disk(".", None, None)
    try:
        parameters = ModelShape.from_args(model_args(cfg)).parameters
    except Exception:  # the model is reported by the throughput check; free space is still useful
        parameters = None
    return env.check_disk(cfg.trainer.out_dir, parameters, cfg.trainer.keep_last_k)


def run(args) -> int:
    """Entry point of `longcpt doctor` (see `longcpt.cli`)."""
    from longcpt.config import load_config

    cfg = load_config(args.recipe, args.overrides, check_paths=False) if args.recipe else None
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
    scratch = Path(tempfile.mkdtemp(prefix="longcpt-doctor-"))
    started = time.perf_counter()
    try:
        # Everything the checks print (Lightning, the training step lines) goes to stderr, so that
        # stdout holds only the table or the JSON.
        with contextlib.redirect_stdout(sys.stderr):
            checks = build_checks(cfg, device, args.quick, scratch, args.peak_tflops)
            results = list(run_checks(checks))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta = {"device": str(device), "quick": args.quick, "recipe": args.recipe, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        print(to_json(results, meta))
    else:
        print(render_table(results))
        print(f"({meta['seconds']:.0f} s on {device}{', --quick' if args.quick else ''})")
    return exit_code(results)
