"""The Llama-family model: plain PyTorch, testable without a Trainer.

Importing the package registers every attention kind with its hooks (`attention/`).
"""

from longcpt.model.config import ModelArgs
from longcpt.model.hf_io import from_pretrained
from longcpt.model.llama import CausalLM

__all__ = ["CausalLM", "ModelArgs", "from_pretrained"]
