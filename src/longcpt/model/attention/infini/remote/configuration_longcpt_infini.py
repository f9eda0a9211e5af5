"""Configuration of a longcpt Infini-attention model, shipped inside every exported folder.

Self-contained: imports only transformers, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without longcpt.
`longcpt.save_pretrained` writes the values; `modeling_longcpt_infini.py` explains them.

RoPE settings live in `longcpt_rope` ({"rope_theta": ..., "rope_type": ..., plus the scaling
parameters}) rather than in `rope_theta` / `rope_scaling` / `rope_parameters`, whose meaning and
handling differ between transformers 4 and 5.
"""

from transformers import PretrainedConfig


class LongcptInfiniConfig(PretrainedConfig):
    """A Llama-family decoder (Llama, Mistral, Qwen2 weights) with Infini-attention."""

    model_type = "longcpt_infini"

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        initializer_range=0.02,
        longcpt_rope=None,
        infini_base_model_type="llama",
        infini_qkv_bias=False,
        infini_o_bias=False,
        infini_mlp_bias=False,
        infini_segment_len=2048,
        infini_memory_update="delta",
        infini_gate_init=-2.5,
        infini_bptt_segments=2,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.longcpt_rope = dict(longcpt_rope or {"rope_theta": 10000.0, "rope_type": "default"})
        self.infini_base_model_type = infini_base_model_type
        self.infini_qkv_bias = infini_qkv_bias
        self.infini_o_bias = infini_o_bias
        self.infini_mlp_bias = infini_mlp_bias
        self.infini_segment_len = infini_segment_len
        self.infini_memory_update = infini_memory_update
        self.infini_gate_init = infini_gate_init
        self.infini_bptt_segments = infini_bptt_segments
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
