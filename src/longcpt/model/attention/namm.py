"""`namm`: a Neural Attention Memory Model evicts KV-cache entries (Cetin et al. 2024, arXiv 2410.13166).

A NAMM is a tiny network, shared by every layer and KV head, that looks at how each cached token
has been attended to and decides whether to keep it. It is trained by evolution
(`longcpt.namm`), because keep/evict is not differentiable; the model stays frozen. What follows
is the reference's configuration (SakanaAI/evo-memory, `namm_bam_i1`), rewritten.

Every `update_every` (512) new tokens, for every layer and KV head (the eviction schedule and the
cache layout are `evict.py`'s):

  1. Attention weights A (n new queries x S cached tokens), averaged over the query heads of the
     KV head. `evict.py` computes them block by block, so nothing bigger than n x S exists.
  2. Spectrogram: each cached token's column A[:, j], prefixed by the last n_fft - hop values of
     its previous column (zeros for a token new in this update), goes through a short-time
     Fourier transform: `n_fft` 32, hop 16, periodic Hann window, no centering, magnitudes.
     That gives n / hop frames of n_fft/2 + 1 = 17 frequencies; thanks to the carried prefix the
     frames of consecutive updates are exactly the frames of one STFT over the whole column.
  3. EMA over the frames, coefficient `ema` (0.99) per token, i.e. a = ema^hop per frame:
         e <- e * ema^n + sum_f (1 - a) a^(F-1-f) |STFT|_f          (F = n / hop frames)
     carried across updates, so two updates equal one pass over the concatenated column.
     (The reference also masks frames older than a new token; those frames only see the zeros
     of causal attention, so the mask changes nothing and is left out.)
  4. Features: the EMA normalised with fixed statistics stored in the policy (the reference
     normalises online and freezes the statistics after its first iteration; `longcpt namm train`
     measures them once with the full cache), after an 8-dim sinusoidal embedding of the token's
     age (newest position - its position; 4 geometric frequencies with base 50000, as the reference).
  5. Scorer, parameters shared across layers and heads, all in one flat vector:
       * `bam` (backward attention memory): x <- x + Attn(x), one head, hidden 32, biases, no RoPE,
         with a *backward* mask (a token attends only to itself and newer tokens), then a linear
         layer to a scalar (the reference's residual MLP of depth 1);
       * `mlp` (the reference's simpler variant): x <- x + relu(W1 x + b1), then a linear layer.
  6. Keep a token iff its score >= 0 (the reference's threshold, so the all-zero policy, the
     first CMA-ES mean, keeps everything); the newest token is always kept.

The backward mask (lower triangle masked) is a causal mask over the reversed sequence, so the
BAM runs as SDPA's `is_causal` kernel on the flipped tokens; the cache's left padding lands at the
end of the flipped sequence, where no valid token looks.

Policy file (`torch.save`, read with `weights_only=True`), version 1:

    {"format": "longcpt-namm", "version": 1,
     "spec": {"scorer", "n_fft", "hop", "ema", "recency_dim", "recency_max_freq", "hidden",
              "update_every"},
     "params": float32 (P,), "feature_mean": (n_fft/2+1,), "feature_std": (n_fft/2+1,),
     "info": {...}}          # free-form: generation, fitness, kv_kept, model, ...

Shapes: B batch, Hk KV heads, S cached tokens, n new queries, F frames, K = n_fft/2 + 1
frequencies, E features per token, H scorer hidden size, N = B * Hk scorer sequences.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from longcpt.errors import LongcptError
from longcpt.model.attention import POSITIVE_INT, Constraint, Option, optional, register
from longcpt.model.attention.evict import EvictingAttention, EvictingCache

POLICY_FORMAT = "longcpt-namm"
POLICY_VERSION = 1
SCORERS = ("bam", "mlp")
_EMA = "namm_ema"  # per-entry EMA of the spectrogram (B, Hk, S, K)
_TAIL = "namm_tail"  # per-entry last n_fft - hop attention values (B, Hk, S, n_fft - hop)
_SPEC_BLOCK = 1 << 22  # (token, frame) pairs per spectrogram block: bounds the STFT's memory


@dataclass(frozen=True)
class NammSpec:
    """The architecture of a NAMM: everything needed to read its flat parameter vector."""

    scorer: str = "bam"
    n_fft: int = 32
    hop: int = 16
    ema: float = 0.99
    recency_dim: int = 8
    recency_max_freq: float = 50000.0
    hidden: int = 32  # BAM attention width (the MLP scorer's hidden width is the feature size)
    update_every: int = 512

    @property
    def frequencies(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def features(self) -> int:
        return self.recency_dim + self.frequencies

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the parameters, in their order in the flat vector."""
        e, h = self.features, self.hidden
        if self.scorer == "bam":
            return [("qkv.weight", (3 * h, e)), ("qkv.bias", (3 * h,)), ("o.weight", (e, h)), ("o.bias", (e,)),
                    ("out.weight", (e,)), ("out.bias", (1,))]
        return [("fc.weight", (e, e)), ("fc.bias", (e,)), ("out.weight", (e,)), ("out.bias", (1,))]

    def param_count(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes())

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when usable)."""
        problems = []
        if self.scorer not in SCORERS:
            problems.append(f"scorer={self.scorer!r}: must be one of {', '.join(SCORERS)}")
        if self.n_fft < 2 or self.n_fft % 2 or not 0 < self.hop <= self.n_fft:
            problems.append(f"n_fft={self.n_fft}, hop={self.hop}: n_fft must be even and 0 < hop <= n_fft")
        elif self.update_every % self.hop:
            problems.append(f"update_every={self.update_every}: must be a multiple of hop={self.hop} "
                            "(the spectrogram advances hop queries per frame)")
        if not 0 < self.ema < 1:
            problems.append(f"ema={self.ema}: must be in (0, 1)")
        if self.recency_dim % 2 or self.recency_dim < 0:
            problems.append(f"recency_dim={self.recency_dim}: must be an even number >= 0")
        return problems


@dataclass
class NammPolicy:
    """A NAMM: its spec, its flat parameters and the feature statistics (see the module docstring).

    Evolution swaps `params` in place between candidates; every layer of a model built with this
    object sees the change.
    """

    spec: NammSpec
    params: torch.Tensor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def zeros(cls, spec: NammSpec) -> NammPolicy:
        """The all-zero policy (keeps everything) with identity feature statistics."""
        k = spec.frequencies
        return cls(spec, torch.zeros(spec.param_count()), torch.zeros(k), torch.ones(k))

    def weights(self) -> dict[str, torch.Tensor]:
        """The flat vector cut into named tensors (views)."""
        out, i = {}, 0
        for name, shape in self.spec.shapes():
            n = math.prod(shape)
            out[name] = self.params[i : i + n].view(shape)
            i += n
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "spec": dataclasses.asdict(self.spec),
                "params": self.params.detach().float().cpu().clone(), "feature_mean": self.feature_mean.float().cpu(),
                "feature_std": self.feature_std.float().cpu(), "info": dict(self.info)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy file atomically."""
        from longcpt.fsio import atomic_file

        with atomic_file(path) as tmp:
            torch.save(self.to_dict(), tmp)
        return Path(path)


def policy_from_dict(data: Any, source: str) -> NammPolicy:
    """Check a policy file's content and build the policy.

    Raises:
        LongcptError: not a NAMM policy, another version, bad settings or a parameter vector of the
            wrong size, each naming `source`.
    """
    if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
        raise LongcptError(f"policy {source}: not a NAMM policy file (train one with `longcpt namm train RECIPE`)")
    if data.get("version") != POLICY_VERSION:
        raise LongcptError(f"policy {source}: format version {data.get('version')!r}; this longcpt reads version "
                           f"{POLICY_VERSION} (retrain it, or use the longcpt version that wrote it)")
    try:
        spec = NammSpec(**data["spec"])
        params, mean, std = data["params"], data["feature_mean"], data["feature_std"]
    except (KeyError, TypeError) as e:
        raise LongcptError(f"policy {source}: missing or unknown field ({e})") from None
    problems = spec.problems()
    if problems:
        raise LongcptError(f"policy {source}: " + "; ".join(problems))
    want = spec.param_count()
    if not isinstance(params, torch.Tensor) or params.shape != (want,):
        got = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
        raise LongcptError(f"policy {source}: params has shape {got}, but a {spec.scorer!r} scorer with these "
                           f"settings has {want} parameters (a file from another scorer or a corrupted file)")
    k = spec.frequencies
    for name, value in (("feature_mean", mean), ("feature_std", std)):
        if not isinstance(value, torch.Tensor) or value.shape != (k,):
            raise LongcptError(f"policy {source}: {name} must have shape ({k},) for n_fft={spec.n_fft}")
    return NammPolicy(spec, params.float(), mean.float(), std.float(), dict(data.get("info", {})))


def load_policy(path: str | os.PathLike) -> NammPolicy:
    """Read a policy file (see the module docstring).

    Raises:
        LongcptError: a missing or unreadable file, or a bad policy (`policy_from_dict`).
    """
    path = Path(path)
    if not path.is_file():
        raise LongcptError(f"policy {path}: no such file (train one with `longcpt namm train RECIPE`; "
                           "its out_dir/namm/policy.pt)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds: the file is not ours
        raise LongcptError(f"policy {path}: not readable as a NAMM policy file ({type(e).__name__}: {e})") from None
    return policy_from_dict(data, str(path))


# ----------------------------------------------------------------------------------------------
# Features: spectrogram of the attention each token receives, EMA, recency.


def stft_magnitudes(signal: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """|STFT| of `signal` (..., L): periodic Hann window, no centering -> (..., F, n_fft/2 + 1).

    Equals `torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=False,
    return_complex=True).abs().transpose(-1, -2)` (tests/model/test_namm.py). A 32-point DFT is
    cheaper as two small matmuls (windowed cosine and sine tables) than as an FFT followed by the
    magnitude of complex numbers: 20x on a CPU for the cache sizes NAMM sees.
    """
    table = _dft_table(n_fft, signal.dtype, signal.device)  # (n_fft, 2K), window included
    frames = signal.unfold(-1, n_fft, hop)  # (..., F, n_fft), a view
    parts = frames.reshape(-1, n_fft) @ table  # (frames, 2K): one GEMM over every frame
    k = n_fft // 2 + 1
    return torch.hypot(parts[:, :k], parts[:, k:]).view(*frames.shape[:-1], k)  # (..., F, K)


def _dft_table(n_fft: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Hann-windowed real-DFT table [cos | sin] (n_fft, 2K): a frame times it gives the real and
    (minus) imaginary parts of its spectrum."""
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * n[:, None] * k[None, :] / n_fft  # (n_fft, K)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)[:, None]
    return torch.cat([window * angle.cos(), window * angle.sin()], dim=1).to(device, dtype)


def ema_frame_weights(frames: int, ema: float, hop: int, device=None) -> torch.Tensor:
    """Weight (1 - a) a^(F-1-f) of frame f in the EMA (a = ema^hop), oldest frame first: (F,)."""
    a = ema**hop
    exponents = torch.arange(frames - 1, -1, -1, dtype=torch.float64, device=device)
    return ((1 - a) * a**exponents).float()


def ema_update(previous: torch.Tensor | None, spectrogram: torch.Tensor, ema: float, hop: int) -> torch.Tensor:
    """The EMA after F more frames: previous (..., K) * ema^(F hop) + weighted frames (..., F, K)."""
    frames = spectrogram.shape[-2]
    w = ema_frame_weights(frames, ema, hop, spectrogram.device)  # (F,)
    new = torch.einsum("...fk,f->...k", spectrogram, w)
    return new if previous is None else previous * ema ** (frames * hop) + new


def recency_embedding(age: torch.Tensor, dim: int, max_freq: float) -> torch.Tensor:
    """Sinusoidal embedding of integer ages (...,) -> (..., dim): [sin(age w_i), cos(age w_i)]."""
    half = dim // 2
    freqs = 1.0 / max_freq ** (torch.arange(half, dtype=torch.float64, device=age.device) / max(half, 1))
    angles = age.double()[..., None] * freqs  # (..., dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def update_features(cache: EvictingCache, rows: torch.Tensor, spec: NammSpec) -> torch.Tensor:
    """Advance the per-token EMA spectrogram with the attention `rows` (B, Hk, n, S) of n new queries.

    Updates `cache.extra` (EMA and carried prefix) and returns the EMA (B, Hk, S, K), unnormalised.
    """
    b, hk, n, s = rows.shape
    carry = spec.n_fft - spec.hop
    if n % spec.hop:
        raise LongcptError(f"namm: an update over {n} queries is not a multiple of hop={spec.hop}")
    columns = rows.transpose(-1, -2)  # (B, Hk, S, n)
    tail = cache.extra.get(_TAIL, columns.new_zeros(b, hk, s, carry))  # (B, Hk, S, carry)
    signal = torch.cat([tail, columns], dim=-1)  # (B, Hk, S, carry + n)
    previous = cache.extra.get(_EMA)  # (B, Hk, S, K) or None
    block = max(1, _SPEC_BLOCK // max(1, b * hk * (n // spec.hop)))
    pieces = []
    for j in range(0, s, block):  # bounded memory: the frames of `block` tokens at a time
        spectrogram = stft_magnitudes(signal[:, :, j : j + block], spec.n_fft, spec.hop)  # (B, Hk, s', F, K)
        old = None if previous is None else previous[:, :, j : j + block]
        pieces.append(ema_update(old, spectrogram, spec.ema, spec.hop))
    ema = torch.cat(pieces, dim=2)  # (B, Hk, S, K)
    cache.extra[_TAIL] = signal[..., signal.shape[-1] - carry :].contiguous()
    cache.extra[_EMA] = ema
    return ema


def token_features(cache: EvictingCache, ema: torch.Tensor, policy: NammPolicy) -> torch.Tensor:
    """Scorer input (B, Hk, S, E): recency embedding, then the normalised EMA spectrogram."""
    spec = policy.spec
    newest = cache.pos[..., -1:]  # (B, Hk, 1): the newest token sits in the last slot
    age = newest - cache.pos  # (B, Hk, S)
    mean, std = policy.feature_mean.to(ema.device), policy.feature_std.to(ema.device)
    normalised = (ema - mean) / std.clamp_min(1e-7)
    if spec.recency_dim == 0:
        return normalised
    return torch.cat([recency_embedding(age, spec.recency_dim, spec.recency_max_freq), normalised], dim=-1)


# ----------------------------------------------------------------------------------------------
# Scorers: flat parameters -> one score per token.


def backward_attention(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One-head attention over x (N, S, E) where token i sees tokens j >= i (itself and newer).

        keys     0 1 2 3
        token 0  x x x x
        token 1  . x x x
        token 3  . . . x          (the "backward" mask: tril(-1) masked)

    Runs as a causal SDPA over the reversed sequence. Returns (N, S, E), the o-projection output.
    """
    h = w["qkv.weight"].shape[0] // 3
    qkv = F.linear(x.flip(1), w["qkv.weight"], w["qkv.bias"])  # (N, S, 3H), newest token first
    q, k, v = qkv.unsqueeze(1).split(h, dim=-1)  # each (N, 1, S, H): one head
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1).flip(1)  # (N, S, H)
    return F.linear(y, w["o.weight"], w["o.bias"])  # (N, S, E)


def score_tokens(features: torch.Tensor, policy: NammPolicy) -> torch.Tensor:
    """Scores (B, Hk, S) of the features (B, Hk, S, E) under `policy`'s scorer."""
    b, hk, s, e = features.shape
    x = features.reshape(b * hk, s, e)  # (N, S, E)
    w = {name: t.to(x.device, x.dtype) for name, t in policy.weights().items()}
    if policy.spec.scorer == "bam":
        x = x + backward_attention(x, w)
    else:
        x = x + F.relu(F.linear(x, w["fc.weight"], w["fc.bias"]))
    return (x @ w["out.weight"] + w["out.bias"]).view(b, hk, s)


# ----------------------------------------------------------------------------------------------
# The attention kind.


def _is_policy(x: Any) -> bool:
    return isinstance(x, NammPolicy) or (isinstance(x, str | os.PathLike) and str(x) != "")


POLICY = Constraint(_is_policy, "the path of a NAMM policy file (longcpt namm train writes out_dir/namm/policy.pt)")


def _namm_problems(options: dict) -> list[str]:
    policy = options["policy"]
    if isinstance(policy, NammPolicy) or Path(policy).is_file():
        return []
    return [f"policy={str(policy)!r}: no such file (train one with `longcpt namm train RECIPE`; its out_dir/namm/policy.pt)"]


@register(
    "namm",
    options={
        "policy": Option(None, POLICY, "trained NAMM policy file (required)"),
        "update_every": Option(None, optional(POSITIVE_INT), "tokens between evictions (default: the policy's own)"),
    },
    trainable=False,
    inference_memory=True,
    check=_namm_problems,
)
class NammAttention(EvictingAttention):
    """Evicts the cached tokens a NAMM scores below zero, every `update_every` tokens."""

    def __init__(self, args, layer_idx: int):
        super().__init__(args, layer_idx)
        opts = args.attention_options
        policy = opts["policy"]
        self.policy = policy if isinstance(policy, NammPolicy) else load_policy(policy)
        self.update_every = opts["update_every"] or self.policy.spec.update_every
        if self.update_every % self.policy.spec.hop:
            raise LongcptError(f"attention kind 'namm': update_every={self.update_every} must be a multiple of the "
                               f"policy's hop={self.policy.spec.hop}")

    def observe(self, cache: EvictingCache, weights: torch.Tensor) -> None:
        cache.pending.append(weights)  # (B, Hk, t, S at the time); padded to the final S at the update

    def select(self, cache: EvictingCache) -> torch.Tensor:
        s = cache.length
        rows = torch.cat([F.pad(w, (0, s - w.shape[-1])) for w in cache.pending], dim=2)  # (B, Hk, n, S)
        ema = update_features(cache, rows, self.policy.spec)
        scores = score_tokens(token_features(cache, ema, self.policy), self.policy)  # (B, Hk, S)
        return scores >= 0
