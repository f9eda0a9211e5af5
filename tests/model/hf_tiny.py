"""Tiny random checkpoints of each supported family, built and saved by transformers itself."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {
    # Llama with every optional bias on; Qwen2 with tied embeddings; Mistral with an explicit head_dim
    "llama": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(head_dim=24)),
}
ROPE_TYPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
}


def tiny_hf_model(family: str = "llama", rope: str = "default", seed: int = 0, **overrides):
    """A tiny transformers model with random (not default) norms and biases so that they matter."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    scaling = ROPE_TYPES[rope]
    rope_parameters = {"rope_theta": 10000.0, **(scaling or {"rope_type": "default"})}
    kwargs = dict(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters=rope_parameters,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(0.0, 0.5).add_(1.0 if "norm" in name else 0.0)
    return model
