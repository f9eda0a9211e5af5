"""`python tests/lit/run_synthetic.py key=value ...`: `longcpt.lit.train.train` on synthetic data.

Used by the multi-process, kill-and-resume and SIGUSR1 tests; Lightning relaunches this same
command for the other ranks.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_helpers import SyntheticDataModule  # noqa: E402

from longcpt.config import load_config  # noqa: E402
from longcpt.errors import LongcptError  # noqa: E402
from longcpt.lit.train import train  # noqa: E402

if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    try:
        result = train(cfg, datamodule=SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size, cfg.trainer.seed))
    except LongcptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"RESULT step={result.global_step} requeued={result.requeued} hf={result.hf_dir}")
