"""Fixtures of the model tests: DeepSpeed's `zero.Init` in this process."""

from __future__ import annotations

import pytest

ZERO3_BF16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}


@pytest.fixture(scope="module")
def zero_init(tmp_path_factory):
    """`deepspeed.zero.Init` with bf16 (ZeRO-3 under bf16-mixed) on a one-process gloo group: a
    function returning a fresh context. The group is destroyed, and LOCAL_RANK, RANK and WORLD_SIZE
    unset, at the end of the module: left set for the session, they told every later `longcpt
    train --devices 2` started from this process that its ranks were launched already, and its
    first rank waited forever for a second one."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    env = pytest.MonkeyPatch()
    for name, value in (("DS_ACCELERATOR", "cpu"), ("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        env.setenv(name, value)
    import deepspeed

    from longcpt.strategies import skip_shm_all_reduce

    skip_shm_all_reduce()
    store = tmp_path_factory.mktemp("zero_init") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield lambda: deepspeed.zero.Init(config_dict_or_path=ZERO3_BF16)
    dist.destroy_process_group()
    env.undo()
