"""Distribution strategies for `longcpt train`: `auto`, `ddp`, `deepspeed` (ZeRO-2/3, offload).

    strategy = build_strategy(cfg, accelerator="gpu")   # what `lightning.Trainer(strategy=...)` takes

DeepSpeed on CPU processes (DESIGN.md section 6). Lightning refuses DeepSpeed unless the accelerator
is CUDA, but DeepSpeed itself trains ZeRO-2/3 on CPU processes over gloo when `DS_ACCELERATOR=cpu`
is set before it is imported. `CPUDeepSpeedStrategy` makes the three changes that needs, and is used
only when the accelerator is the CPU: that is how CI trains, saves and converts real ZeRO
checkpoints on a machine without a GPU. On GPUs the stock `DeepSpeedStrategy` runs.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from longcpt.config import Config
from longcpt.errors import ConfigError

# Keys Lightning derives from the recipe; a copy under strategy.deepspeed would disagree with it.
_DERIVED_DEEPSPEED_KEYS = {
    "gradient_accumulation_steps": "optim.accumulate_grad_batches",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "train_batch_size": "data.micro_batch_size (times devices and accumulation)",
    "optimizer": "optim.* (longcpt builds AdamW with its parameter groups)",
    "scheduler": "optim.warmup_steps / optim.min_lr_ratio",
}


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config dict for a recipe: ZeRO stage, offload, then `strategy.deepspeed` on top.

    Lightning fills in gradient accumulation, clipping and the bf16 section from the Trainer.

    Raises:
        ConfigError: `strategy.deepspeed` sets a key that the recipe owns elsewhere.
    """
    s = cfg.strategy
    clashes = [
        f"strategy.deepspeed.{key}: set by {owner}; remove it from strategy.deepspeed"
        for key, owner in _DERIVED_DEEPSPEED_KEYS.items()
        if key in s.deepspeed
    ]
    if clashes:
        raise ConfigError(clashes)
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
        # Our AdamW (or DeepSpeedCPUAdam with optimizer offload) is passed in from Python.
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
    }
    return _deep_merge(config, s.deepspeed)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy on CPU processes (gloo), for tests and CPU-only machines.

    The three changes of DESIGN.md section 6, nothing else:
      1. `setup_environment` skips the CUDA-only check but keeps the DDP setup it would call;
      2. `setup_distributed` skips the device-index validation (CPU devices have no index);
      3. `deepspeed.initialize` gets the local rank as `device_rank` (not `root_device.index`,
         which is None on CPU).
    """

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
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


def resolve_accelerator(accelerator: str) -> str:
    """`auto` -> `gpu` when CUDA is available, else `cpu`."""
    if accelerator != "auto":
        return accelerator
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def prepare_environment(cfg: Config, accelerator: str) -> None:
    """Environment DeepSpeed reads at import time; call before anything imports deepspeed.

    On CPU, `DS_ACCELERATOR=cpu` selects DeepSpeed's CPU accelerator (else it probes for CUDA).
    """
    if cfg.strategy.name == "deepspeed" and accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_strategy(cfg: Config, accelerator: str):
    """What `Trainer(strategy=...)` gets for `cfg.strategy` on `accelerator` ("cpu" or "gpu").

    Returns:
        "auto", a `DDPStrategy`, or a (CPU) `DeepSpeedStrategy`.
    """
    name = cfg.strategy.name
    if name == "auto":
        return "auto"
    if name == "ddp":
        # Every parameter gets a gradient every step, so DDP need not search for unused ones.
        return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)
    config = deepspeed_config(cfg)
    cls = CPUDeepSpeedStrategy if accelerator == "cpu" else DeepSpeedStrategy
    return cls(config=config)
