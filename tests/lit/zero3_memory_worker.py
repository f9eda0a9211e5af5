"""`python tests/lit/zero3_memory_worker.py MODE OUT_DIR key=value ...`: host memory of ZeRO-3 setup.

Starts `longcpt.lit.train.train` on the recipe given as overrides (Lightning relaunches this same
command for the other ranks), records each rank's peak resident memory (VmHWM) once the imports
are done (the fixed runtime overhead: Python, torch, Lightning, DeepSpeed), once the Trainer,
the process group and the data are set up (the module's `setup` hook, which Lightning calls just
before `configure_model`) and when the model is ready (right after `configure_model`), writes
OUT_DIR/rank{r}.json and exits there, before DeepSpeed builds its engine.

MODE `partitioned` is what `longcpt train` does; `whole` forces the former path (every rank builds
and loads the whole model before DeepSpeed partitions it), for comparison.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_helpers import SyntheticDataModule  # noqa: E402

import longcpt.strategies  # noqa: E402
from longcpt.config import load_config  # noqa: E402
from longcpt.lit.module import LitCausalLM  # noqa: E402
from longcpt.lit.train import train  # noqa: E402
from longcpt.model.rope import RotaryEmbedding  # noqa: E402

MIB = 2**20
record: dict = {}


def peak_mib() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that over from
    the parent across fork and exec, so a rank started by a large process would report its parent's."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024 / MIB


def finish(out: Path, module: LitCausalLM) -> None:
    """Record the model's RoPE table and parameter count next to the peaks, then end every rank:
    what comes next (DeepSpeed's engine and optimizer) is not what the test measures."""
    import torch.distributed as dist

    rope = module.model.model.rotary_emb
    fresh = RotaryEmbedding(rope.head_dim, rope.theta, rope.scaling, rope.max_position_embeddings)
    record["rope_scaling"] = rope.scaling
    record["rope_inv_freq_exact"] = torch.equal(rope.inv_freq.cpu(), fresh.inv_freq)
    record["parameters"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.model.parameters())
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "whole":
        longcpt.strategies.builds_partitioned = lambda cfg: False
    configure_model, setup = LitCausalLM.configure_model, LitCausalLM.setup

    def measured_setup(self, stage: str) -> None:
        setup(self, stage)
        record["setup_peak_mib"] = peak_mib()

    def measured_configure_model(self) -> None:
        configure_model(self)
        record["model_peak_mib"] = peak_mib()
        finish(out, self)

    LitCausalLM.configure_model, LitCausalLM.setup = measured_configure_model, measured_setup
    record["imports_peak_mib"] = peak_mib()
    cfg = load_config(None, sys.argv[3:])
    train(cfg, datamodule=SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size))
    sys.exit("stopped without building the model")
