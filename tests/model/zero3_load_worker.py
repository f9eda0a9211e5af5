"""`python tests/model/zero3_load_worker.py MODEL_DIR OUT_DIR BAD_KEY` on every rank (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set): ZeRO-3 loading (`from_pretrained(partitioned=True)` inside
`deepspeed.zero.Init`) where rank 0's read of tensor BAD_KEY fails with an I/O error.

Each rank writes OUT_DIR/rank{r}.json: the type and message of what it raised. The process group's
timeout is 60 s, so a rank left waiting for rank 0 fails within the test's time. (The test starts
the ranks as fork server children, which call `main([MODEL_DIR, OUT_DIR, BAD_KEY])`.)
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import longcpt  # noqa: E402
from longcpt.model import hf_io  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    model_dir, out, bad = (argv or sys.argv[1:])[:3]
    model_dir, out = Path(model_dir), Path(out)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    read = hf_io.WeightFiles.__getitem__

    def failing_read(self, name):
        if name == bad and rank == 0:
            raise OSError(5, "Input/output error", str(model_dir / "model.safetensors"))
        return read(self, name)

    hf_io.WeightFiles.__getitem__ = failing_read
    import deepspeed

    from longcpt.strategies import skip_shm_all_reduce

    skip_shm_all_reduce()
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    try:
        with deepspeed.zero.Init(config_dict_or_path=config):
            longcpt.from_pretrained(model_dir, partitioned=True)
        result = {"raised": None, "message": ""}
    except Exception as e:  # noqa: BLE001  (what each rank raised is the result)
        result = {"raised": type(e).__name__, "message": str(e)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
