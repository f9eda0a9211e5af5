"""The Llama-family model: plain PyTorch, testable without a Trainer.

Importing the package registers every attention kind (`attention/`) and the training loss of the
kinds that bring their own (`infini.py`).
"""

from longcpt.model import infini  # noqa: F401  (registers Infini's segment-major training loss)
from longcpt.model.config import ModelArgs
from longcpt.model.hf_io import from_pretrained
from longcpt.model.llama import CausalLM

__all__ = ["CausalLM", "ModelArgs", "from_pretrained"]
