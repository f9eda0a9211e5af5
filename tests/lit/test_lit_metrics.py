"""Training metrics without a Trainer: what is logged on which micro-batch."""

from types import SimpleNamespace

import torch

from longcpt.config import Config
from longcpt.lit.progress import TrainMetrics


def test_deepspeed_grad_norm_is_logged_on_the_micro_batch_that_completed_its_step():
    """Two optimizer steps of two micro-batches. DeepSpeed's engine reports the norm of the last
    step; logged on every micro-batch, the first micro-batch of step 2 would show step 1's norm."""
    engine = SimpleNamespace(norm=None)
    engine.get_global_grad_norm = lambda: engine.norm
    trainer = SimpleNamespace(strategy=SimpleNamespace(deepspeed_engine=engine), global_step=0, global_rank=0,
                              world_size=1)
    logged = []
    module = SimpleNamespace(model=torch.nn.Linear(2, 2), cfg=Config(),
                             log=lambda name, value, **kw: logged.append((trainer.global_step, name, value)))
    metrics = TrainMetrics()
    metrics.on_train_start(trainer, module)
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long)}
    # (global step after the micro-batch, the engine's norm then): steps complete on micro-batches 1 and 3
    for micro, (step, norm) in enumerate([(0, None), (1, 3.0), (1, 3.0), (2, 5.0)]):
        trainer.global_step, engine.norm = step, norm
        metrics.on_train_batch_end(trainer, module, None, batch, micro)
    assert [(s, v) for s, name, v in logged if name == "train/grad_norm"] == [(1, 3.0), (2, 5.0)]
