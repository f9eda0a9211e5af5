"""The Llama-family model: plain PyTorch, testable without a Trainer."""

from longcpt.model.config import ModelArgs
from longcpt.model.hf_io import from_pretrained, save_pretrained
from longcpt.model.llama import CausalLM

__all__ = ["CausalLM", "ModelArgs", "from_pretrained", "save_pretrained"]
