"""Rotary position embedding: the only place in longcpt that computes or applies RoPE.

Layout: Hugging Face "rotate half" (the two halves of the head dim form the complex pairs), so
weights move between longcpt and transformers without permutation.

The BF16 fixes (arXiv 2411.13476; measured in docs/rope_bf16.md) live here:
  * `inv_freq` and the angles are float32 whatever the module is cast to, and the same whatever
    context it is built in (`_float_range`: inside DeepSpeed's `zero.Init` or not). A buffer that
    `model.to(torch.bfloat16)` converts (as `bf16-true` and DeepSpeed do) is the classic bug
    (transformers PRs #25681, #29285): bf16 angles destroy the relative property at long positions.
    `RotaryEmbedding._apply` therefore restores the fp32 table after every cast.
  * `precision="fp32"` also rotates in float32 and casts the rotated q/k back to the input dtype;
    `precision="model"` is transformers' path (cos/sin cast to the input dtype, bf16 rotation).
In float32 both precisions are bit-identical to transformers.

Scaling types (`rope_type`) match transformers numerically: default, linear, dynamic (NTK), yarn,
llama3. Dynamic NTK is computed from the largest position of each call (stateless); transformers
caches the largest length seen so far, which gives the same values whenever lengths only grow
(one call, or generation with a cache).

Shapes: B batch, T tokens, H heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROPE_PRECISIONS = ("fp32", "model")


def _float_range(start: int, end: int, step: int = 1) -> torch.Tensor:
    """float32 `arange` built from integers, whatever context the module is constructed in.

    A float `torch.arange` is not context-free: DeepSpeed's `zero.Init` (ZeRO-3 with a pretrained
    model) wraps torch's tensor factories and casts every floating result to bf16, which rounded
    YaRN's ramp and moved 16 of its 64 frequencies by up to 1%; a bf16 default dtype would do the
    same. Integer results are left alone, and `.float()` is not a factory.
    """
    return torch.arange(start, end, step, dtype=torch.int64).float()


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) in float32 and the cos/sin scale ("attention factor").

    Args:
        head_dim: rotary dimension D.
        theta: RoPE base.
        scaling: None for plain RoPE, else a dict with `rope_type` and its parameters.
        max_position_embeddings: the model's configured context length (dynamic NTK reference).
        seq_len: current sequence length; used by `dynamic` only.
    """
    exponents = _float_range(0, head_dim, 2) / head_dim
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "default":
        return 1.0 / (theta**exponents), 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return 1.0 / (theta**exponents) / factor, 1.0
    if rope_type == "dynamic":
        # Beyond the configured length transformers computes the new base from a tensor length
        # (float32 arithmetic), below it from Python floats; mirrored for bit-equal tables.
        length: Any = max_position_embeddings
        if seq_len is not None and seq_len > max_position_embeddings:
            length = torch.tensor(seq_len, dtype=torch.int64)
        ntk = (factor * length / max_position_embeddings) - (factor - 1)
        base = theta * ntk ** (head_dim / (head_dim - 2))
        return 1.0 / (base**exponents), 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(1.0 / (theta**exponents), scaling), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(head_dim, theta, scaling)
    raise ValueError(f"unknown rope_type {rope_type!r}")


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, smooth ramp between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_frequencies(dim: int, theta: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): blend interpolated and extrapolated frequencies, scale cos/sin."""
    factor = float(s["factor"])
    original = s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((_float_range(0, dim // 2) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (_float_range(0, dim, 2) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; always float32 (see the module docstring)."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 4096,
        precision: str = "fp32",
    ):
        super().__init__()
        if precision not in ROPE_PRECISIONS:
            raise ValueError(f"rope precision must be one of {ROPE_PRECISIONS}, got {precision!r}")
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.max_position_embeddings = max_position_embeddings
        self.precision = precision
        self.dynamic = bool(scaling) and scaling["rope_type"] == "dynamic"
        inv_freq, self.attention_factor = rope_frequencies(head_dim, theta, scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Let device moves through but never a dtype cast: after any conversion (`.to(bf16)`,
        # `.half()`, `to_empty` from the meta device) the table is recomputed in float32 on the new
        # device, so a bf16 model still rotates with exact frequencies.
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        if device.type != "meta":
            inv_freq, _ = rope_frequencies(self.head_dim, self.theta, self.scaling, self.max_position_embeddings)
            self.inv_freq = inv_freq.to(device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 cos and sin, each (B, T, D), for integer `position_ids` (B, T)."""
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            inv_freq, _ = rope_frequencies(
                self.head_dim, self.theta, self.scaling, self.max_position_embeddings, seq_len
            )
            inv_freq = inv_freq.to(position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Rotate one tensor x (B, H, T, D) with float32 cos/sin (B, T, D), as `apply_rotary` does.

    For kinds whose queries and keys take different positions (InfLLM rotates its window keys, its
    queries and its memory separately).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D) broadcast over heads
    if precision == "fp32":
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) with float32 cos/sin (B, T, D).

    `fp32` upcasts q/k, rotates in float32 and casts back; `model` rotates in the input dtype.
    """
    return rotate(q, cos, sin, precision), rotate(k, cos, sin, precision)
