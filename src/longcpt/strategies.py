"""Distribution strategies for `longcpt train`: `auto`, `ddp`, `deepspeed` (ZeRO-2/3, offload).

    problems = strategy_problems(cfg)                   # what `config.validate` reports
    strategy = build_strategy(cfg, accelerator="gpu")   # what `lightning.Trainer(strategy=...)` takes

This module owns the rules of the `strategy:` recipe section: which options each strategy takes,
which DeepSpeed keys the recipe derives itself, and what `sequence_parallel` requires.
Lightning is imported only when a strategy is built, so validating a recipe stays quick.

DeepSpeed on CPU processes. Lightning refuses DeepSpeed unless the accelerator
is CUDA, but DeepSpeed itself trains ZeRO-2/3 on CPU processes over gloo when `DS_ACCELERATOR=cpu`
is set before it is imported. `CPUDeepSpeedStrategy` makes the three changes that needs, and is used
only when the accelerator is the CPU: that is how CI trains, saves and converts real ZeRO
checkpoints on a machine without a GPU. On GPUs the stock `DeepSpeedStrategy` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import socket
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from longcpt.errors import ConfigError

STRATEGY_NAMES = ("auto", "ddp", "deepspeed")
ZERO_STAGES = (2, 3)

# Keys Lightning derives from the recipe; a copy under strategy.deepspeed would disagree with it.
_DERIVED_DEEPSPEED_KEYS = {
    "gradient_accumulation_steps": "optim.accumulate_grad_batches",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "train_batch_size": "data.micro_batch_size (times devices and accumulation)",
    "sequence_parallel_size": "strategy.sequence_parallel",
    "optimizer": "optim.* (longcpt builds AdamW with its parameter groups)",
    "scheduler": "optim.warmup_steps / optim.min_lr_ratio",
}


def strategy_problems(cfg) -> list[str]:
    """Every problem of the `strategy:` section, given the rest of the recipe (key, value, fix)."""
    s = cfg.strategy
    problems = []
    if s.name not in STRATEGY_NAMES:
        problems.append(f"strategy.name={s.name!r}: must be one of {', '.join(STRATEGY_NAMES)}")
    if s.stage not in ZERO_STAGES:
        problems.append(f"strategy.stage={s.stage!r}: must be one of {', '.join(map(str, ZERO_STAGES))}")
    if s.name != "deepspeed" and (s.offload_optimizer or s.offload_parameters):
        problems.append(f"strategy.offload_*=true with strategy.name={s.name!r}: offload needs strategy.name=deepspeed")
    if s.offload_parameters and s.stage != 3:
        problems.append(f"strategy.offload_parameters=true with strategy.stage={s.stage}: parameter offload needs stage 3")
    problems += [
        f"strategy.deepspeed.{key}: set by {owner}; remove it from strategy.deepspeed"
        for key, owner in _DERIVED_DEEPSPEED_KEYS.items()
        if key in s.deepspeed
    ]
    return problems + _sequence_parallel_problems(cfg)


def _sequence_parallel_problems(cfg) -> list[str]:
    """`strategy.sequence_parallel: N`: N ranks share a window, so N must divide what they split."""
    n = cfg.strategy.sequence_parallel
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return [f"strategy.sequence_parallel={n!r}: must be a positive integer (1 = off)"]
    if n == 1:
        return []
    from longcpt.model.attention import KINDS

    key = f"strategy.sequence_parallel={n}"
    problems = []
    spec = KINDS.get(cfg.attention.kind)
    if spec is not None and not spec.sequence_parallel:
        why = f" ({spec.hooks.no_sequence_parallel})" if spec.hooks.no_sequence_parallel else ""
        supported = ", ".join(name for name, other in KINDS.items() if other.sequence_parallel)
        problems.append(f"{key} with attention.kind={cfg.attention.kind!r}: not supported{why}; "
                        f"sequence parallelism works with {supported}")
    if cfg.strategy.name not in ("ddp", "deepspeed"):
        problems.append(f"{key} with strategy.name={cfg.strategy.name!r}: set strategy.name=ddp or deepspeed")
    t = cfg.trainer
    if isinstance(t.devices, int):
        world = t.devices * t.num_nodes
        if world % n:
            problems.append(f"{key}: must divide the world size trainer.devices x trainer.num_nodes = "
                            f"{t.devices} x {t.num_nodes} = {world}")
    if cfg.data.seq_len % n:
        problems.append(f"{key}: must divide data.seq_len={cfg.data.seq_len} (each rank holds seq_len / N tokens)")
    heads, kv_heads = _head_counts(cfg)
    if heads is not None and heads % n:
        problems.append(f"{key}: must divide num_attention_heads={heads} (each rank attends with heads / N of them)")
    if kv_heads is not None and kv_heads % n and n % kv_heads:
        problems.append(f"{key} and num_key_value_heads={kv_heads}: one must divide the other (KV heads are "
                        "split across ranks, or repeated when there are fewer KV heads than ranks)")
    return problems


def builds_partitioned(cfg) -> bool:
    """Whether the model is built inside `deepspeed.zero.Init` and loaded into its partitions.

    Under ZeRO-3 with `model.pretrained`, each rank builds only its 1/world partition of every
    parameter and rank 0 fills them from the files one module at a time, so no rank holds the
    whole model (`longcpt.model.hf_io.build_model`). A model from `model.config` is built whole,
    as before: its random initialisation then stays identical to the other strategies' runs.
    """
    s = cfg.strategy
    return s.name == "deepspeed" and s.stage == 3 and cfg.model.pretrained is not None


def data_parallel_coordinates(global_rank: int, world_size: int, sequence_parallel: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of a rank: which windows it reads.

    The N = `sequence_parallel` consecutive ranks k*N .. k*N+N-1 form group k and share its
    windows, so there are world_size / N data-parallel shards. Consecutive ranks sit on the same
    node, where the all-to-alls of a group are cheapest.
    """
    return global_rank // sequence_parallel, world_size // sequence_parallel


def sequence_parallel_group(size: int, timeout_minutes: float | None = None):
    """This rank's process group of `size` consecutive ranks (see `data_parallel_coordinates`).

    Call on every rank after `torch.distributed` is initialised: each rank creates every group,
    in the same order, as `torch.distributed.new_group` requires. The groups get the run's
    collective timeout (`trainer.timeout_minutes`), as the world group does: without it torch
    gives them its backend default (10 minutes for NCCL), so a hung all-to-all would end the run on
    another schedule than every other collective. A group whose ranks sit on more than one node
    is correct but slow (two all-to-alls per layer cross the network): a warning says so.

    Args:
        size: N, `strategy.sequence_parallel`.
        timeout_minutes: `trainer.timeout_minutes` (None: torch's default).

    Raises:
        ConfigError: the world size, known only now with `trainer.devices=auto`, is not a
            multiple of `size`.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ConfigError([f"strategy.sequence_parallel={size}: must divide the world size, which is {world} "
                           "here (set trainer.devices and trainer.num_nodes explicitly)"])
    members: dict[int, list[int]] = {}
    for r in range(world):
        members.setdefault(data_parallel_coordinates(r, world, size)[0], []).append(r)
    timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    mine = None
    for ranks in members.values():
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    spanning = groups_spanning_nodes(list(members.values()), hosts)
    if spanning and rank == 0:
        ranks, names = spanning[0]
        warnings.warn(
            f"strategy.sequence_parallel={size}: {len(spanning)} of {len(members)} sequence-parallel groups span "
            f"nodes (ranks {ranks[0]}-{ranks[-1]} on {', '.join(names)}); their all-to-alls cross the network, "
            "which is slow. Keep N <= GPUs per node (trainer.devices) and launch ranks in blocks per node "
            "(SLURM's default block distribution, not cyclic)", RuntimeWarning, stacklevel=2)
    return mine


def groups_spanning_nodes(groups: list[list[int]], hosts: list[str | None]) -> list[tuple[list[int], list[str]]]:
    """The groups whose ranks are on more than one host, each with its hosts in rank order.

    Args:
        groups: ranks of each group.
        hosts: host name of every rank (index = global rank).
    """
    out = []
    for ranks in groups:
        names = list(dict.fromkeys(str(hosts[r]) for r in ranks))
        if len(names) > 1:
            out.append((ranks, names))
    return out


def _head_counts(cfg) -> tuple[int | None, int | None]:
    """(query heads, KV heads) of the recipe's model when known without loading it."""
    hf = dict(cfg.model.config)
    if cfg.model.pretrained is not None:
        file = Path(cfg.model.pretrained) / "config.json"
        try:
            hf = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            return None, None  # reported by the path checks or when the model loads
    heads = hf.get("num_attention_heads")
    return heads, hf.get("num_key_value_heads") or heads


def deepspeed_config(cfg) -> dict[str, Any]:
    """The DeepSpeed config dict for a recipe: ZeRO stage, offload, then `strategy.deepspeed` on top.

    Lightning fills in gradient accumulation, clipping and the bf16 section from the Trainer.

    Raises:
        ConfigError: the strategy section has problems (`strategy_problems`; `validate` reports
            them before this runs).
    """
    s = cfg.strategy
    problems = strategy_problems(cfg)
    if problems:
        raise ConfigError(problems)
    zero: dict[str, Any] = {
        "stage": s.stage,
        # Overlapping the gradient reduction with the backward is the usual choice on GPUs.
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if s.stage == 3:
        # Export reads the fp32 master weights with DeepSpeed's zero_to_fp32 (exact), so gathering a
        # 16-bit copy on every save is not needed (transformers PR #25817 is the bug when it is).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "zero_optimization": zero,
        # Gradients are summed over micro-batches and reduced across ranks in fp32, as under DDP
        # (whose fp32 parameters get fp32 gradients with bf16-mixed). DeepSpeed's defaults follow
        # the model dtype, i.e. bf16 under bf16: its engine falls back to the model dtype when
        # `grad_accum_dtype` is unset (`get_data_types`) and to bf16 for `communication_data_type`.
        # The fp32 gradient partitions cost 4 bytes per parameter / ranks (ZeRO-2/3).
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        # Our AdamW (or DeepSpeedCPUAdam with optimizer offload) is passed in from Python.
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
    }
    if s.sequence_parallel > 1:
        # N ranks share each window, so a step holds micro x accumulation x world / N windows.
        # DeepSpeed's config divides its world size by this key when no model-parallel unit is
        # given, for `train_batch_size` (and the samples it counts) only; its ZeRO optimizers
        # average gradients over their own groups, which stay the whole world (the N-fold
        # gradient of the sequence-parallel loss relies on that: `longcpt.model.loss.chunked_cross_entropy`).
        config["sequence_parallel_size"] = s.sequence_parallel
    return _deep_merge(config, s.deepspeed)


def load_dtype(cfg) -> str:
    """The dtype to load pretrained weights in: the one the parameters get anyway once the strategy
    is set up, so that no rank holds a float32 copy it is about to round.

    * DeepSpeed with bf16 casts the module's parameters to bf16 when it wraps the model
      (`DeepSpeedEngine._configure_distributed_model`, deepspeed/runtime/engine.py), before its
      ZeRO optimizer builds the fp32 master copies from those bf16 values;
    * `bf16-true` has Lightning cast the whole module to bf16 (its precision plugin's
      `convert_module`).
    * with `model.lora` under bf16 training, the frozen weights are never updated, so they need no
      float32 copy: they stay in bf16 (the trained ones are made float32, `longcpt.lora.adapters`).
    Loading in bf16 then gives the same bits, with half the host memory per rank: under ZeRO-3
    every rank loads the whole model before DeepSpeed partitions it. Otherwise: "fp32".
    """
    precision = cfg.trainer.precision
    if precision == "bf16-true" or (cfg.strategy.name == "deepspeed" and precision.startswith("bf16")):
        return "bf16"
    if cfg.model.lora is not None and precision.startswith("bf16"):
        return "bf16"
    return "fp32"


@contextlib.contextmanager
def outside_zero_init(active: bool = True):
    """Build modules whole inside a `deepspeed.zero.Init` context (`active`): the adapters peft adds
    to a partitioned model initialise their weights in place, which a partition (an empty tensor)
    cannot take; DeepSpeed converts them to partitions when it wraps the model."""
    if not active:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@functools.cache
def _cpu_deepspeed_class():
    """Lightning's DeepSpeed strategy on CPU processes (gloo), for tests and CPU-only machines.

    Defined on first use so that importing this module (to validate a recipe) does not import
    Lightning. Three changes, nothing else:
      1. `setup_environment` skips the CUDA-only check but keeps the DDP setup it would call;
      2. `setup_distributed` skips the device-index validation (CPU devices have no index) and
         DeepSpeed's shared-memory all-reduce kernel (`skip_shm_all_reduce`);
      3. `deepspeed.initialize` gets the local rank as `device_rank` (not `root_device.index`,
         which is None on CPU).
    """
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeed over gloo on CPU processes (see `_cpu_deepspeed_class`)."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            skip_shm_all_reduce()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            import deepspeed

            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=self.config,
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
            return engine, ds_optimizer

        def _get_process_group_backend(self) -> str:
            return "gloo"

    return CPUDeepSpeedStrategy


def skip_shm_all_reduce() -> None:
    """Tell DeepSpeed's CPU accelerator not to build its shared-memory all-reduce kernel; call
    before DeepSpeed starts its communication backend (`deepspeed.init_distributed`, `zero.Init`).

    DeepSpeed builds that C++ kernel (gcc, through torch's extension loader) the first time a
    process group starts on a machine: about 40 s of wall time and 57 s of CPU on 2 cores, while the
    other ranks wait on its lock. Only `inference_all_reduce` (tensor-parallel inference) uses it;
    training's collectives (ZeRO's gathers and reduce-scatters, the gradient all-reduce) go through
    the process group, gloo here, with or without it.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def __getattr__(name: str):
    if name == "CPUDeepSpeedStrategy":
        return _cpu_deepspeed_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_accelerator(accelerator: str) -> str:
    """`auto` -> `gpu` when CUDA is available, else `cpu`."""
    if accelerator != "auto":
        return accelerator
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def prepare_environment(cfg, accelerator: str) -> None:
    """Environment DeepSpeed reads at import time; call before anything imports deepspeed.

    On CPU, `DS_ACCELERATOR=cpu` selects DeepSpeed's CPU accelerator (else it probes for CUDA).
    """
    if cfg.strategy.name == "deepspeed" and accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def process_count(cfg, accelerator: str) -> int:
    """Processes a run starts: devices per node (`auto`: every GPU, one CPU process) x nodes."""
    devices = cfg.trainer.devices
    if not isinstance(devices, int):
        import torch

        devices = torch.cuda.device_count() if accelerator == "gpu" else 1
    return devices * cfg.trainer.num_nodes


def build_strategy(cfg, accelerator: str):
    """What `Trainer(strategy=...)` gets for `cfg.strategy` on `accelerator` ("cpu" or "gpu").

    Every multi-process strategy gets `trainer.timeout_minutes` as its process-group timeout: a
    collective (gradient all-reduce, barrier, ...) that waits longer for a hung or dead rank raises
    instead of hanging (with gloo, an error in the waiting ranks; with NCCL, torch's watchdog ends
    the process after the same time). `auto` with several processes is therefore built here as the
    DDP strategy Lightning would pick, so that it gets the timeout too.

    Returns:
        "auto" (one process), a `DDPStrategy`, or a (CPU) `DeepSpeedStrategy`.
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    name = cfg.strategy.name
    timeout = timedelta(minutes=cfg.trainer.timeout_minutes)
    if name == "auto" and process_count(cfg, accelerator) == 1:
        return "auto"
    if name in ("auto", "ddp"):
        # Every parameter gets a gradient every step, so DDP need not search for unused ones.
        return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True, timeout=timeout)
    config = deepspeed_config(cfg)
    cls = _cpu_deepspeed_class() if accelerator == "cpu" else DeepSpeedStrategy
    # LoRA: checkpoints hold the trained parameters only (the frozen ones are the base folder's).
    return cls(config=config, timeout=timeout, exclude_frozen_parameters=cfg.model.lora is not None)
