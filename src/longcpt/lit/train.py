"""`longcpt train RECIPE [key=value ...]`: model + DataModule + Lightning Trainer.

    longcpt train recipes/tiny_cpu.yaml trainer.max_steps=50

What a run directory (`trainer.out_dir`) holds:

    config.yaml      the resolved recipe of the latest launch
    tokenizer/       copy of the tokenizer (export and evaluation use it)
    checkpoints/     step-*.ckpt (files, or folders under DeepSpeed) and `last` -> the newest
    logs/csv/        metrics.csv per launch (version_0, version_1 after a resume, ...)
    logs/tensorboard when tensorboard is installed
    hf/              the exported model when trainer.export_hf=true
    nonfinite/       the offending batch when the loss became NaN/inf

Launching the same command with the same `out_dir` resumes from `checkpoints/last` (what a SLURM
requeue does) unless `trainer.resume=false`, which moves old checkpoints aside and starts over.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcpt.config import Config, load_config, save_config, validate
from longcpt.errors import LongcptError

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainResult:
    """What a finished (or requeued) `train` call produced."""

    out_dir: Path
    global_step: int
    last_checkpoint: Path | None
    hf_dir: Path | None
    requeued: bool
    requeue_failed: bool = False  # stopped on the SLURM signal, but `scontrol requeue` failed


def build_model(cfg: Config, tokenizer):
    """The model a recipe asks for: `model.pretrained` loaded, or `model.config` built from scratch.

    The attention kind and its options, the RoPE precision and overrides come from the recipe (already
    validated: `config.validate` checked the kind, its options and the vocabulary size). Parameters
    are float32, except pretrained weights that the strategy would round to bf16 anyway, which are
    loaded in bf16 (`strategies.load_dtype`); the Trainer's precision decides what the forward
    runs in.

    Args:
        cfg: a validated recipe.
        tokenizer: the run's tokenizer (`longcpt.data.load_tokenizer`); a model built from scratch
            takes its vocabulary size and special ids.

    Raises:
        LongcptError: a `model.config` missing an HF field, or weights that do not fit it.
    """
    from longcpt.model.config import ModelArgs
    from longcpt.model.hf_io import build_model as build_from_args
    from longcpt.model.hf_io import from_pretrained
    from longcpt.strategies import load_dtype

    kind, options, m = cfg.attention.kind, dict(cfg.attention.options), cfg.model
    if m.pretrained is not None:
        model = from_pretrained(m.pretrained, attention=kind, dtype=load_dtype(cfg), rope_precision=cfg.rope.precision,
                                rope_theta=m.rope_theta, rope_scaling=m.rope_scaling, **options)
    else:
        hf = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **m.config}
        if m.rope_theta is not None:
            hf["rope_theta"] = m.rope_theta
        if m.rope_scaling is not None:
            hf["rope_scaling"] = dict(m.rope_scaling)
        try:
            args = ModelArgs.from_hf_config(hf, source="model.config")
        except KeyError as e:
            raise LongcptError(f"model.config: missing field {e.args[0]!r} (an HF config.json field)") from None
        args.attention, args.attention_options, args.rope_precision = kind, options, cfg.rope.precision
        model = build_from_args(args)
    model.activation_checkpointing = cfg.trainer.activation_checkpointing
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
    from longcpt.lit.callbacks import newest_checkpoint

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


def _loggers(out: Path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(out / "logs", name="csv")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        loggers.append(TensorBoardLogger(out / "logs", name="tensorboard"))
    return loggers


def _cpu_threads(devices: Any) -> None:
    """Give each local CPU process its share of the cores (torch would give each all of them)."""
    import torch

    local = devices if isinstance(devices, int) else 1
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _callbacks(cfg: Config, out: Path, extra: list):
    """longcpt's callbacks in the order they must run, then `extra`; and the SLURM plugins."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from longcpt.lit.callbacks import ProgressBar, RunCheckpoints, SlurmRequeue, StepPrinter, TrainMetrics

    t = cfg.trainer
    checkpoints = RunCheckpoints(out / CHECKPOINT_DIR, t.save_every_n_steps, t.keep_last_k)
    callbacks = [checkpoints, TrainMetrics(window=max(t.log_every_n_steps, 10))]
    plugins, requeue = [], None
    if SLURMEnvironment.detect():
        # Ranks and addresses from SLURM; requeue handled by SlurmRequeue at a step boundary.
        plugins.append(SLURMEnvironment(auto_requeue=False))
        requeue = SlurmRequeue(checkpoints)
        callbacks.append(requeue)
        if t.export_hf and _is_rank_zero():
            print("trainer.export_hf=true: the export runs at the end of this job, after the requeue handler is gone "
                  "(a late SIGUSR1 kills it); for large models export with slurm/convert.sbatch instead", flush=True)
    callbacks.append(ProgressBar() if _interactive() else StepPrinter(t.log_every_n_steps))
    return callbacks + list(extra), plugins, requeue


def _interactive() -> bool:
    return os.isatty(1) and os.environ.get("TERM", "dumb") != "dumb"


def _trainer(cfg: Config, accelerator: str, out: Path, callbacks: list, plugins: list):
    """The Lightning Trainer for a recipe: hardware, loop length, precision, optimisation, outputs."""
    import lightning.pytorch as pl

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
    outputs = dict(logger=_loggers(out), log_every_n_steps=t.log_every_n_steps, callbacks=callbacks,
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
        LongcptError: bad model/tokenizer settings, or a non-finite loss (`NonFiniteLossError`).
    """
    from longcpt.strategies import prepare_environment, resolve_accelerator

    validate(cfg)  # a recipe built in Python (tests, notebooks) gets the same checks as `longcpt train`
    t = cfg.trainer
    accelerator = resolve_accelerator(t.accelerator)
    prepare_environment(cfg, accelerator)  # before anything imports deepspeed

    import lightning.pytorch as pl

    from longcpt.data import build_datamodule, load_tokenizer
    from longcpt.lit.module import LitCausalLM

    out = Path(t.out_dir).resolve()
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(t, out_dir=str(out)))
    tokenizer_dir = cfg.model.tokenizer or cfg.model.pretrained
    resume_from = _prepare_run_dir(cfg, tokenizer_dir)

    pl.seed_everything(t.seed, workers=True, verbose=False)
    if accelerator == "cpu":
        _cpu_threads(t.devices)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(cfg, tokenizer)
    datamodule = datamodule if datamodule is not None else build_datamodule(cfg, tokenizer)
    module = LitCausalLM(model, cfg, tokenizer_dir=str(out / "tokenizer"))
    callbacks, plugins, requeue = _callbacks(cfg, out, callbacks or [])
    trainer = _trainer(cfg, accelerator, out, callbacks, plugins)
    if resume_from is not None and _is_rank_zero():
        print(f"resuming from {resume_from}", flush=True)
    with warnings.catch_warnings():
        # Lightning cannot see that the DataModule restores its own position (it saves
        # `datamodule.state_dict()` with the step); its mid-epoch "not resumable" warning is wrong here.
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        # Our own checkpoints hold training state beyond tensors (RNG, data position): full unpickling.
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=False)

    stopped, requeued = bool(requeue and requeue.stopped), bool(requeue and requeue.requeued)
    last = (out / CHECKPOINT_DIR / "last") if (out / CHECKPOINT_DIR / "last").exists() else None
    hf_dir = None
    if t.export_hf and not stopped and last is not None and trainer.is_global_zero:
        from longcpt.export.convert import export_checkpoint

        hf_dir = export_checkpoint(last, out / "hf")
    return TrainResult(out, trainer.global_step, last, hf_dir, requeued, requeue_failed=stopped and not requeued)


def run(args) -> int:
    """Entry point of `longcpt train` (see `longcpt.cli`)."""
    cfg = load_config(args.recipe, args.overrides, check_paths=True)
    result = train(cfg)
    if _is_rank_zero():
        state = ("stopped for requeue at" if result.requeued else
                 "stopped on the SLURM signal at" if result.requeue_failed else "finished at")
        print(f"longcpt train: {state} step {result.global_step}; run folder {result.out_dir}")
        if result.last_checkpoint is not None:
            print(f"  last checkpoint: {os.path.realpath(result.last_checkpoint)}")
        if result.hf_dir is not None:
            print(f"  Hugging Face export: {result.hf_dir}")
        if result.requeue_failed:
            print("longcpt train: error: `scontrol requeue` failed (see the warning above), so nothing will resume "
                  "this run: submit the same command again; it resumes from checkpoints/last", file=sys.stderr)
    return 1 if result.requeue_failed else 0
