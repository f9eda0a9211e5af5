"""Infini-attention Llama-family model for plain transformers (`trust_remote_code=True`).

Shipped by longcpt inside every exported Infini folder. Self-contained: imports only torch and
transformers. Parameter names are transformers' Llama names plus one gate per layer
(`model.layers.{i}.self_attn.core.gate`), and the computation is longcpt's `infini` attention
(Munkhdalai et al. 2024, arXiv 2404.07143, section 3.1). For every layer and segment of
`infini_segment_len` = N tokens:

    sq, sk = elu(q) + 1, elu(k) + 1                    q, k BEFORE RoPE, float32
    A_mem  = (sq @ M) / (sq @ z)                       memory of the earlier segments (0 at first)
    A_dot  = causal softmax attention inside the segment, RoPE at positions 0 .. N-1
    A      = sigmoid(gate) * A_mem + (1 - sigmoid(gate)) * A_dot     one gate per query head
    write after reading, per KV head (float32):
        linear: M += sk^T v      delta: M += sk^T (v - (sk @ M) / (sk @ z))      z += sum sk

Each row of `input_ids` is one sequence starting at position 0 (no padding: an attention mask
with zeros is refused). Streaming: `model(ids, use_cache=True)` returns `infini_state`, and
`model(more_ids, infini_state=state)` continues the same sequences (any chunk lengths; the state
holds M, z and the un-rotated keys/values of the unfinished segment per layer, so it stays
bounded however long the input). `generate` uses it (greedy and sampling; beam search, which
would have to reorder the state, is not supported).

Shapes: B batch, T tokens, Hq / Hk query / KV heads, D head dim, L tokens of the current segment.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_longcpt_infini import LongcptInfiniConfig

DENOMINATOR_EPS = 1e-6
# transformers 5 declares tied weights as {target: source}, transformers 4 as a list of targets.
_TIED = {"lm_head.weight": "model.embed_tokens.weight"}
if int(transformers.__version__.split(".")[0]) < 5:
    _TIED = ["lm_head.weight"]


def rope_frequencies(head_dim, rope, max_position_embeddings, seq_len):
    """Inverse frequencies (D/2,) float32 and the cos/sin scale, as transformers computes them."""
    theta = float(rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(rope["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "dynamic":
        length = max_position_embeddings
        if seq_len > max_position_embeddings:
            length = torch.tensor(seq_len, dtype=torch.int64)
        base = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base**exponents), 1.0
    if rope_type == "llama3":
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(head_dim, theta, rope)
    raise ValueError(f"unknown rope_type {rope_type!r}")


def _yarn_frequencies(dim, theta, rope):
    """YaRN (arXiv 2309.00071) frequencies and attention factor."""
    factor = float(rope["factor"])
    original = rope["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x, cos, sin):
    """RoPE in float32 (the BF16 fix), cast back: x (B, H, L, D), cos/sin (L, D)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def feature_map(x):
    return F.elu(x.float()) + 1.0


def repeat_kv(x, groups):
    """(B, Hk, L, D) -> (B, Hk * groups, L, D): query head h uses KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        c, f, bias = config.hidden_size, config.intermediate_size, config.infini_mlp_bias
        self.gate_proj = nn.Linear(c, f, bias=bias)
        self.up_proj = nn.Linear(c, f, bias=bias)
        self.down_proj = nn.Linear(f, c, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class InfiniGate(nn.Module):
    """Holds the per-head gate logit (named like longcpt's attention core)."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Parameter(torch.full((config.num_attention_heads,), float(config.infini_gate_init)))


class InfiniAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.segment_len = config.infini_segment_len
        self.delta = config.infini_memory_update == "delta"
        self.q_proj = nn.Linear(c, self.n_heads * d, bias=config.infini_qkv_bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * d, bias=config.infini_qkv_bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * d, bias=config.infini_qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, c, bias=config.infini_o_bias)
        self.core = InfiniGate(config)

    def forward(self, x, cos, sin, cache):
        """x (B, T, C) continues the sequences `cache` describes; cos/sin (N, D); `cache` (one
        layer's part of an InfiniState: memory, norm, and the open segment's keys/values) is
        updated in place."""
        b, t, _ = x.shape
        n, groups = self.segment_len, self.n_heads // self.n_kv_heads
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hk, T, D)
        if cache["keys"] is not None:  # the open segment's earlier tokens, un-rotated
            k, v = torch.cat([cache["keys"], k], dim=2), torch.cat([cache["values"], v], dim=2)
        offset = k.shape[2] - t  # where the new tokens start inside the open segment
        total = k.shape[2]
        gate = torch.sigmoid(self.core.gate.float()).view(1, -1, 1, 1)  # (1, Hq, 1, 1)
        memory, norm = cache["memory"], cache["norm"]  # (B, Hk, D, D), (B, Hk, D) float32 once written
        outputs = []
        for start in range(0, total, n):
            end = min(start + n, total)
            first = max(start, offset)  # first new token of this segment
            qs = q[:, :, first - offset : end - offset]  # (B, Hq, Lq, D)
            ks, vs = k[:, :, start:end], v[:, :, start:end]  # (B, Hk, L, D)
            length, new = end - start, end - first
            qr = rotate(qs, cos[first - start : length], sin[first - start : length])
            kr = rotate(ks, cos[:length], sin[:length])
            # Causal with the new tokens at the end of the segment (bottom-right aligned).
            mask = None if new == length else torch.ones(new, length, dtype=torch.bool, device=x.device).tril(length - new)
            a_dot = F.scaled_dot_product_attention(
                qr, repeat_kv(kr, groups), repeat_kv(vs, groups), attn_mask=mask, is_causal=mask is None
            )
            with torch.autocast(device_type=x.device.type, enabled=False):
                y = (1 - gate) * a_dot.float()
                if memory is not None:
                    sq = feature_map(qs)  # (B, Hq, Lq, D)
                    numerator = sq @ repeat_kv(memory, groups)  # (B, Hq, Lq, D)
                    denominator = sq @ repeat_kv(norm[..., None], groups)  # (B, Hq, Lq, 1)
                    y = y + gate * numerator / denominator.clamp(min=DENOMINATOR_EPS)
                if length == n:  # a complete segment: write it for the segments after it
                    sk, vf = feature_map(ks), vs.float()
                    if memory is None:
                        memory, norm = sk.transpose(-1, -2) @ vf, sk.sum(dim=2)
                    else:
                        if self.delta:
                            vf = vf - (sk @ memory) / (sk @ norm[..., None]).clamp(min=DENOMINATOR_EPS)
                        memory, norm = memory + sk.transpose(-1, -2) @ vf, norm + sk.sum(dim=2)
            outputs.append(y.to(x.dtype))
        rest = total - total % n  # the unfinished segment's tokens wait in the cache
        cache.update(memory=memory, norm=norm, keys=k[:, :, rest:] if rest < total else None,
                     values=v[:, :, rest:] if rest < total else None)
        y = torch.cat(outputs, dim=2).transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, Hq*D)
        return self.o_proj(y)


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = InfiniAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LongcptInfiniPreTrainedModel(PreTrainedModel):
    config_class = LongcptInfiniConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, InfiniGate):
            nn.init.constant_(module.gate, float(self.config.infini_gate_init))


class LongcptInfiniModel(LongcptInfiniPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def local_rope(self, device):
        """cos, sin (N, D) float32 for the local positions 0 .. N-1 of a segment."""
        config = self.config
        n = config.infini_segment_len
        inv_freq, scale = rope_frequencies(config.head_dim, config.longcpt_rope, config.max_position_embeddings, n)
        positions = torch.arange(n, device=device).float()
        freqs = positions[:, None] * inv_freq.to(device)[None]  # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, D)
        return emb.cos() * scale, emb.sin() * scale

    def forward(self, input_ids, state=None):
        """Hidden states (B, T, C); `state` (an InfiniState, updated in place) continues earlier calls."""
        state = state if state is not None else InfiniState(self.config.num_hidden_layers)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.local_rope(input_ids.device)
        for layer, cache in zip(self.layers, state.layers):
            x = layer(x, cos, sin, cache)
        state.seen += input_ids.shape[1]
        return self.norm(x)


class InfiniState:
    """Where a batch of sequences stands: per layer, the memory M, the normalizer z and the
    un-rotated keys/values of the unfinished segment (fewer than N tokens); `seen` tokens so far."""

    def __init__(self, num_layers):
        self.layers = [dict(memory=None, norm=None, keys=None, values=None) for _ in range(num_layers)]
        self.seen = 0


@dataclass
class InfiniCausalLMOutput(CausalLMOutputWithPast):
    infini_state: InfiniState | None = None


class LongcptInfiniForCausalLM(LongcptInfiniPreTrainedModel, GenerationMixin):
    _tied_weights_keys = _TIED

    def __init__(self, config):
        super().__init__(config)
        self.model = LongcptInfiniModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, infini_state=None, use_cache=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Infini-attention rows start at position 0: padding (attention_mask zeros) is not supported")
        state = infini_state if infini_state is not None else InfiniState(self.config.num_hidden_layers)
        logits = self.lm_head(self.model(input_ids, state))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        keep = use_cache or infini_state is not None
        return InfiniCausalLMOutput(loss=loss, logits=logits, infini_state=state if keep else None)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, infini_state=None, use_cache=None, **kwargs):
        # With a state, only the tokens it has not seen yet go in (one per step after the prompt).
        if infini_state is not None:
            input_ids = input_ids[:, infini_state.seen :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "infini_state": infini_state,
                "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["infini_state"] = getattr(outputs, "infini_state", None)
        return model_kwargs
