"""`longcpt train RECIPE [key=value ...]`: model + DataModule + Lightning Trainer.

    longcpt train recipes/tiny_cpu.yaml trainer.max_steps=50

What a run directory (`trainer.out_dir`) holds:

    config.yaml      the resolved recipe of the latest launch
    tokenizer/       copy of the tokenizer (export and evaluation use it)
    checkpoints/     step-*.ckpt (files, or folders under DeepSpeed), each with its manifest
                     (step-*.ckpt.manifest.json), `last` -> the newest; *.corrupt: failed verification
    logs/            one folder per logger of trainer.loggers (csv/: metrics.csv per launch,
                     tensorboard/, wandb/, mlflow/; longcpt.logs), each with the resolved recipe
    hf/              the exported model when trainer.export_hf=true
    inductor/        torch.compile's kernels when trainer.compile is not none (unless
                     TORCHINDUCTOR_CACHE_DIR is set): a resumed run reuses them
    nonfinite/       the offending batch when the loss became NaN/inf
    restarts/        under SLURM, one record per requeue after a hung or dead rank

Launching the same command with the same `out_dir` resumes from the newest checkpoint that
verifies (what a SLURM requeue does) unless `trainer.resume=false`, which moves old checkpoints
aside and starts over. docs/reliability.md lists every fault and what happens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcpt import early_signals
from longcpt.config import Config, load_config, resolve, save_config, validate

CHECKPOINT_DIR = "checkpoints"
INDUCTOR_DIR = "inductor"  # torch.compile's kernels (trainer.compile), kept for resumed runs


@dataclass
class TrainResult:
    """What a finished (or stopped) `train` call produced."""

    out_dir: Path
    global_step: int
    last_checkpoint: Path | None
    hf_dir: Path | None
    requeued: bool
    stopped_by: str | None = None  # "SIGTERM" / "SIGUSR1": stopped early with a checkpoint
    requeue_failed: bool = False  # stopped on the SLURM signal, but `scontrol requeue` failed


def build_model(cfg: Config, tokenizer, partitioned: bool = False):
    """The model a recipe asks for: `model.pretrained` loaded, or `model.config` built from scratch.

    Its arguments are `longcpt.model.recipe.model_args`'s (architecture, RoPE overrides, attention
    kind and options, RoPE precision). Parameters are float32, except pretrained weights that the
    strategy would round to bf16 anyway, which are loaded in bf16 (`strategies.load_dtype`); the
    Trainer's precision decides what the forward runs in. With `model.lora`, peft's adapters are
    injected and only what the section trains stays trainable (`longcpt.lora`).

    Args:
        cfg: a resolved recipe (`longcpt.config.load_config`).
        tokenizer: the run's tokenizer (`longcpt.data.load_tokenizer`); a model built from scratch
            takes its vocabulary size and special ids.
        partitioned: load `model.pretrained` into ZeRO-3 partitions; called inside
            `deepspeed.zero.Init` (`LitCausalLM.configure_model`; see `longcpt.model.hf_io`).

    Raises:
        LongcptError: a `model.config` missing an HF field, or weights that do not fit it.
    """
    from longcpt.model.hf_io import build_model as build_from_args
    from longcpt.model.hf_io import load_pretrained
    from longcpt.model.recipe import model_args
    from longcpt.strategies import load_dtype

    args = model_args(cfg, tokenizer)
    if cfg.model.pretrained is not None:
        model = load_pretrained(cfg.model.pretrained, args, dtype=load_dtype(cfg), partitioned=partitioned)
    else:
        model = build_from_args(args)
    if cfg.model.lora is not None:
        from longcpt.lora.adapters import adapter_summary, apply_lora
        from longcpt.strategies import outside_zero_init

        with outside_zero_init(partitioned):  # adapters built whole: DeepSpeed partitions them when it wraps the model
            apply_lora(model, cfg.model.lora, seed=cfg.trainer.seed)
        if _is_rank_zero():
            print(adapter_summary(model), flush=True)
    model.activation_checkpointing = cfg.trainer.activation_checkpointing
    if cfg.model.fused_kernels != "none":
        from longcpt.model.fused import apply_fused_kernels

        apply_fused_kernels(model, cfg.model.fused_kernels)
    return model


def _is_rank_zero() -> bool:
    """Is this process global rank 0? Usable before the Trainer exists (decided from the launcher's
    environment, the way Lightning's cluster environments will).

    Lightning's own `rank_zero_only.rank` reads RANK, LOCAL_RANK or SLURM_PROCID only. Under its
    multi-node launcher without SLURM (NODE_RANK=n on each node, LOCAL_RANK set for the processes
    it starts but not for the first), every node's first process would think it is rank 0, and
    all of them would write config.yaml and the tokenizer, and move checkpoints/ aside, at once.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = os.environ
    if "RANK" in env:  # torchrun / torchelastic: the global rank itself
        return int(env["RANK"]) == 0
    if SLURMEnvironment.detect():  # srun: one task per process
        return int(env.get("SLURM_PROCID", 0)) == 0
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))  # Lightning's launcher (LightningEnvironment)
    return node == 0 and int(env.get("LOCAL_RANK", 0)) == 0


def _prepare_run_dir(cfg: Config, tokenizer_dir: str) -> Path | None:
    """Resolve resume, save config.yaml and copy the tokenizer; returns the checkpoint to resume."""
    from longcpt.data.tokenizer import copy_tokenizer_files
    from longcpt.fsio import atomic_dir
    from longcpt.lit.checkpoints import newest_checkpoint

    out = Path(cfg.trainer.out_dir)
    ckpts = out / CHECKPOINT_DIR
    last = newest_checkpoint(ckpts)
    if _is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.trainer.resume and ckpts.exists():
            aside = out / f"{CHECKPOINT_DIR}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(ckpts, aside)
            print(f"trainer.resume=false: previous checkpoints moved to {aside}", flush=True)
        save_config(cfg, out / "config.yaml")
        with atomic_dir(out / "tokenizer") as tmp:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return last if cfg.trainer.resume else None


def _cpu_threads(devices: Any) -> None:
    """Give each local CPU process its share of the cores (torch would give each all of them)."""
    import torch

    local = devices if isinstance(devices, int) else 1
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _callbacks(cfg: Config, out: Path, extra: list):
    """longcpt's callbacks in the order they must run, then `extra`; the plugins; the stop callback."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from longcpt.lit.checkpoint_io import RunCheckpointIO
    from longcpt.lit.checkpoints import RunCheckpoints
    from longcpt.lit.progress import ProgressBar, StepPrinter, TrainMetrics
    from longcpt.lit.stopping import StopAtStepBoundary

    t = cfg.trainer
    checkpoints = RunCheckpoints(out / CHECKPOINT_DIR, t.save_every_n_steps, t.keep_last_k, resume=t.resume)
    callbacks = [checkpoints, TrainMetrics(window=max(t.log_every_n_steps, 10))]
    # Lightning files are written straight into the checkpoint folder (DeepSpeed writes its own).
    plugins = [] if cfg.strategy.name == "deepspeed" else [RunCheckpointIO()]
    slurm = SLURMEnvironment.detect()
    if slurm:
        # Ranks and addresses from SLURM; its requeue signal handled by StopAtStepBoundary.
        plugins.append(SLURMEnvironment(auto_requeue=False))
        if t.export_hf and _is_rank_zero():
            print("trainer.export_hf=true: the export runs at the end of this job, after training stopped acting on "
                  "the requeue signal (a time limit reached during it ends the job without an export); for large "
                  "models export with slurm/convert.sbatch instead", flush=True)
    else:  # nothing acts on SIGUSR1 here: its default action again (the CLI recorded it under any SLURM job)
        early_signals.release(signal.SIGUSR1)
    stop = StopAtStepBoundary(checkpoints, requeue_signal=signal.SIGUSR1 if slurm else None)
    callbacks.append(stop)
    callbacks.append(ProgressBar() if _interactive() else StepPrinter(t.log_every_n_steps))
    return callbacks + list(extra), plugins, stop


def _interactive() -> bool:
    return os.isatty(1) and os.environ.get("TERM", "dumb") != "dumb"


def _trainer(cfg: Config, accelerator: str, out: Path, callbacks: list, plugins: list):
    """The Lightning Trainer for a recipe: hardware, loop length, precision, optimisation, outputs."""
    import lightning.pytorch as pl

    from longcpt.logs import run_loggers
    from longcpt.strategies import build_strategy

    t, accumulate = cfg.trainer, cfg.optim.accumulate_grad_batches
    hardware = dict(accelerator=accelerator, devices=t.devices, num_nodes=t.num_nodes,
                    strategy=build_strategy(cfg, accelerator), precision=t.precision, plugins=plugins)
    # The stream is endless: max_steps ends the run. Validation every val_every_n_steps optimizer
    # steps (Lightning counts micro-batches).
    loop = dict(max_steps=t.max_steps, max_epochs=-1, val_check_interval=t.val_every_n_steps * accumulate,
                check_val_every_n_epoch=None, limit_val_batches=cfg.data.val_batches, num_sanity_val_steps=0)
    optimisation = dict(accumulate_grad_batches=accumulate, gradient_clip_val=cfg.optim.grad_clip or None,
                        gradient_clip_algorithm="norm")
    outputs = dict(logger=run_loggers(out, t.loggers, t.resume, _is_rank_zero()), log_every_n_steps=t.log_every_n_steps, callbacks=callbacks,
                   enable_checkpointing=False,  # RunCheckpoints does it atomically
                   enable_progress_bar=_interactive(), enable_model_summary=False, default_root_dir=out)
    # longcpt.data shards by rank itself.
    return pl.Trainer(**hardware, **loop, **optimisation, **outputs, use_distributed_sampler=False)


def train(cfg: Config, datamodule=None, callbacks: list | None = None) -> TrainResult:
    """Train as the recipe says; resume from the newest checkpoint in `out_dir/checkpoints`.

    Args:
        cfg: a validated recipe (`load_config`).
        datamodule: a LightningDataModule to use instead of `longcpt.data.build_datamodule`
            (tests pass small synthetic ones).
        callbacks: extra Lightning callbacks, run after longcpt's own.

    Returns:
        The run's `TrainResult`.

    Raises:
        LongcptError: bad model/tokenizer settings, a non-finite loss (`NonFiniteLossError`), a
            checkpoint that cannot be written (`CheckpointWriteError`), no checkpoint that verifies,
            vanished or damaged data, or another rank that hung or died (`RankFailureError`).
    """
    from longcpt.strategies import builds_partitioned, prepare_environment, resolve_accelerator

    validate(cfg)  # a recipe built in Python (tests, notebooks) gets the same checks as `longcpt train`
    cfg = resolve(cfg)  # the kind's options completed (unchanged when `load_config` made `cfg`)
    t = cfg.trainer
    accelerator = resolve_accelerator(t.accelerator)
    prepare_environment(cfg, accelerator)  # before anything imports deepspeed

    import lightning.pytorch as pl

    from longcpt.data import build_datamodule, load_tokenizer
    from longcpt.lit.module import LitCausalLM
    from longcpt.logs import log_recipe

    out = Path(t.out_dir).resolve()
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(t, out_dir=str(out)))
    tokenizer_dir = cfg.model.tokenizer or cfg.model.pretrained
    resume_from = _prepare_run_dir(cfg, tokenizer_dir)
    if t.compile != "none":  # before any rank compiles: a resumed run reuses the kernels
        from longcpt.model.compile import use_cache_dir

        use_cache_dir(out / INDUCTOR_DIR)

    pl.seed_everything(t.seed, workers=True, verbose=False)
    if accelerator == "cpu":
        _cpu_threads(t.devices)
    tokenizer = load_tokenizer(tokenizer_dir)
    if builds_partitioned(cfg):  # ZeRO-3 loading: each rank builds only its partitions, in configure_model
        model = functools.partial(build_model, cfg, tokenizer, partitioned=True)
    else:
        model = build_model(cfg, tokenizer)
    datamodule = datamodule if datamodule is not None else build_datamodule(cfg, tokenizer)
    module = LitCausalLM(model, cfg, tokenizer_dir=str(out / "tokenizer"))
    callbacks, plugins, stop = _callbacks(cfg, out, callbacks or [])
    trainer = _trainer(cfg, accelerator, out, callbacks, plugins)
    log_recipe(trainer.loggers, cfg, out / "logs", _is_rank_zero())
    # RunCheckpoints verifies the checkpoints once the ranks can agree, sets aside damaged ones and
    # points `last` at the newest that verifies: that is what Lightning then loads.
    ckpt_path = str(out / CHECKPOINT_DIR / "last") if resume_from is not None else None
    with warnings.catch_warnings():
        # Lightning cannot see that the DataModule restores its own position (it saves
        # `datamodule.state_dict()` with the step); its mid-epoch "not resumable" warning is wrong here.
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        # torch 2.13 deprecates the collectives DeepSpeed's ZeRO-3 calls at every step, and the
        # warning came back every step (a `warnings.catch_warnings` resets Python's once-per-place
        # memory): ~4 lines per step in a 2-rank job log.
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
        # Our own checkpoints hold training state beyond tensors (RNG, data position): full unpickling.
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        except Exception as e:
            _raise_rank_failure(e, trainer, cfg)
            raise

    last = (out / CHECKPOINT_DIR / "last") if (out / CHECKPOINT_DIR / "last").exists() else None
    hf_dir = None
    if t.export_hf and stop.stopped_by is None and last is not None and trainer.is_global_zero:
        from longcpt.export.convert import export_checkpoint

        hf_dir = export_checkpoint(last, out / "hf")
    return TrainResult(out, trainer.global_step, last, hf_dir, stop.requeued, stop.stopped_by, stop.requeue_failed)


def _raise_rank_failure(error: Exception, trainer, cfg: Config) -> None:
    """A collective that failed because another rank hung or died: one message (and, under SLURM,
    a requeue bounded by trainer.max_restarts) instead of the backend's traceback."""
    from longcpt.lit.faults import RankFailureError, failure_message, rank_failure, requeue_after_fault

    kind = rank_failure(error)
    if kind is None:
        return
    t = cfg.trainer
    what = failure_message(kind, trainer.global_rank, trainer.global_step, t.timeout_minutes, error)
    then = requeue_after_fault(Path(t.out_dir), t.max_restarts, trainer.global_rank, trainer.global_step, what)
    raise RankFailureError(f"{what}. {then}") from None


def run(args) -> int:
    """Entry point of `longcpt train` (see `longcpt.cli`)."""
    cfg = load_config(args.recipe, args.overrides, check_paths=True)
    result = train(cfg)
    if _is_rank_zero():
        state = ("stopped for requeue at" if result.requeued else
                 "stopped on the SLURM signal at" if result.requeue_failed else
                 f"stopped by {result.stopped_by} (the same command resumes) at" if result.stopped_by else
                 "finished at")
        print(f"longcpt train: {state} step {result.global_step}; run folder {result.out_dir}")
        if result.last_checkpoint is not None:
            print(f"  last checkpoint: {os.path.realpath(result.last_checkpoint)}")
        if result.hf_dir is not None:
            print(f"  Hugging Face export: {result.hf_dir}")
        if result.requeue_failed:
            print("longcpt train: error: `scontrol requeue` failed (see the warning above), so nothing will resume "
                  "this run: submit the same command again; it resumes from checkpoints/last", file=sys.stderr)
    return 1 if result.requeue_failed else 0
