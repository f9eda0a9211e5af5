"""Tiny tokenizers and models the tests build themselves (no hub, no internet), in one place.

Tokenizers
    bpe_tokenizer     byte-level BPE trained on passkey / BookSum-like sentences (real merges)
    word_tokenizer    word-level `t3 t4 ...` whose ids are the numbers: synthetic windows map 1:1
Models
    tiny_hf_model     a transformers checkpoint of each family (llama, mistral, qwen2) and rope type,
                      with random norms and biases so that they matter
    tiny_llama        transformers' Llama with a large init, so that greedy decoding has clear winners
    tiny_args         `ModelArgs` of a small longcpt `CausalLM` (override any field)
    tiny_infini       a longcpt Infini model with random (not initial) gates
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from longcpt.model import CausalLM, ModelArgs

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAD, BOS, EOS = 0, 1, 2
TEXT = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.",
    "I will quiz you about the important information there. What is the pass key? The pass key is",
    "The pass key is 12345. Remember it. 12345 is the pass key. 67890 31415 27182 0123456789",
    "Summarize the following text. Summary: the chapter tells how the hero went there and back again.",
]


def bpe_tokenizer(vocab_size: int = 400, bos: bool = True, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `TEXT`, wrapped the way AutoTokenizer loads it (BOS optional;
    `add_bos`: encoding puts BOS first, as Llama's tokenizers do)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>", pad_token="<pad>"
    )


def word_tokenizer(folder: Path, vocab_size: int = 96) -> Path:
    """A word-level tokenizer `t3 t4 ...` with <pad>/<s>/</s>, saved as a transformers folder."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return folder


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
        vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_parameters=rope_parameters,
        bos_token_id=BOS, eos_token_id=EOS,
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


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with GQA and a large init so that greedy decoding has clear winners."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False), **overrides})
    return LlamaForCausalLM(config).eval()


def tiny_args(**overrides) -> ModelArgs:
    """A 2-layer, 32-wide GQA Llama (4 heads of 8, 2 KV heads, vocab 64) for our own `CausalLM`."""
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )
    return ModelArgs(**{**base, **overrides})


def tiny_infini(seed: int = 0, gates: float = 2.0, dtype=torch.float32, layers: int = 2, **options) -> CausalLM:
    """`tiny_args` as an Infini model (8-token segments unless given) with gates uniform in [-gates, gates]."""
    torch.manual_seed(seed)
    model = CausalLM(tiny_args(num_hidden_layers=layers, attention="infini",
                               attention_options={"segment_len": 8, **options}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".core.gate"):
                p.uniform_(-gates, gates)
    return model.to(dtype)


def eager_fused_kernels(calls: dict):
    """Stand-ins for `model.fused_kernels` (rms_norm, silu_mul) with the eager code's numerics, each
    counting its calls in calls["norm"] / calls["mlp"]: the fused kernels' wiring, on a CPU."""
    import torch.nn.functional as F

    from longcpt.model.llama import rms_norm as eager_rms_norm

    def rms_norm(x, weight, eps):
        calls["norm"] += 1
        return eager_rms_norm(x, weight, eps)

    def silu_mul(gate, up):
        calls["mlp"] += 1
        return F.silu(gate) * up

    return rms_norm, silu_mul
