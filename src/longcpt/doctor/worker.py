"""`python -m longcpt.doctor.worker CHECK.json`: one multi-process step check of `longcpt doctor`.

Started by `longcpt.doctor.steps` in its own process group; Lightning's launcher then starts the
other ranks with this same command (which is why it is a module of its own and not `longcpt
doctor`, which would start the whole doctor again in every rank).
"""

from __future__ import annotations

import json
import sys

from longcpt.doctor.steps import run_step

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run_step(json.load(f))
