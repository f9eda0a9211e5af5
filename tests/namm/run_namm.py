"""`longcpt namm train` in a subprocess with the tests' `continue` task registered.

    python run_namm.py MODEL_DIR RECIPE [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from namm_helpers import register_continue_task  # noqa: E402

from longcpt.cli import main  # noqa: E402

if __name__ == "__main__":
    register_continue_task(Path(sys.argv[1]))
    sys.exit(main(["namm", "train", *sys.argv[2:]]))
