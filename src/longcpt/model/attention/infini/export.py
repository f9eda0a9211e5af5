"""The modeling files shipped in every exported Infini-attention folder.

transformers has no Infini-attention, so `save_pretrained` copies two self-contained files from
`remote/` (they import only torch and transformers) next to the weights:

    folder/
      config.json                       model_type=longcpt_infini, auto_map, infini_* fields
      configuration_longcpt_infini.py   LongcptInfiniConfig
      modeling_longcpt_infini.py        LongcptInfiniForCausalLM (same logits as longcpt)
      model.safetensors, generation_config.json, tokenizer files (as for every export)

so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it in plain
transformers, and `longcpt.from_pretrained(folder)` reads it back as an `infini` model. The
config.json fields are `hf_config.py`'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_longcpt_infini.py", "modeling_longcpt_infini.py")


def write_remote_code(folder: Path) -> None:
    """Copy the self-contained configuration and modeling files into an export folder."""
    for name in REMOTE_FILES:
        shutil.copy2(REMOTE_DIR / name, Path(folder) / name)
