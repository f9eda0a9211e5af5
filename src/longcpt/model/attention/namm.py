"""`namm`: a Neural Attention Memory Model evicts KV-cache entries (Cetin et al. 2024, arXiv 2410.13166).

A NAMM is a tiny network, shared by every layer and KV head, that looks at how each cached token
has been attended to and decides whether to keep it. It is trained by evolution
(`longcpt.namm`), because keep/evict is not differentiable; the model stays frozen. What follows
is the reference's configuration (SakanaAI/evo-memory, `namm_bam_i1`), rewritten; the
differences are listed at the end.

As attention runs (`evict.py` gives each block of queries' weights to `observe`):

  1. Attention weights A (queries x S cached tokens), averaged over the query heads of the KV
     head. `evict.py` computes them block by block, so nothing bigger than a block x S exists.
  2. Spectrogram: each cached token's column A[:, j] (zeros before the token existed) goes
     through a short-time Fourier transform: `n_fft` 32, hop 16, periodic Hann window, no
     centering, magnitudes; a frame ends at every query position p with (p + 1) % hop == 0 and
     covers A[p - n_fft + 1 .. p, j]. That gives n_fft/2 + 1 = 17 frequencies per frame.
  3. EMA over the frames, coefficient `ema` (0.99) per query, i.e. a = ema^hop per frame:
         e <- a e + (1 - a) |STFT|_f
     Each frame is folded in as soon as its queries exist, so per token the policy holds only the
     EMA and the last n_fft - 1 attention values (the carried n_fft - hop and the frame being
     filled), never the attention rows since the last update. (The reference also masks frames
     older than a new token; those frames only see the zeros of causal attention, so the mask
     changes nothing and is left out.)
Every `update_every` (512) tokens, for every layer and KV head (the schedule and the cache layout
are `evict.py`'s):
  4. Features: the EMA normalised with fixed statistics stored in the policy (the reference
     normalises online and freezes the statistics after its first iteration; `longcpt namm train`
     measures them once, over every update of a full-cache pass), after an 8-dim sinusoidal
     embedding of the token's age (newest position - its position; 4 geometric frequencies with
     base 50000, as the reference's run configuration, whose `start_recency_from` is 0).
  5. Scorer, parameters shared across layers and heads, all in one flat vector:
       * `bam` (backward attention memory), the reference's: [r, m] = Attn(x) with one head of
         width 32, biases, no RoPE, a *backward* mask (a token attends only to itself and newer
         tokens) and an output of twice the feature width; then x <- x * (1 + m) + r (the
         reference's `residual` and `mult` with no gate non-linearity) and a linear layer to a
         scalar (its MLP of depth 1). 4,172 parameters for 25 features;
       * `mlp`, this project's own cheaper variant (not one of the reference's scorers):
         x <- x + relu(W1 x + b1), then a linear layer. 676 parameters.
  6. Selection (`selection`):
       * `reference` (default), the reference's `BinarySelection`: in every row, each KV head of
         the layer keeps the same number K of tokens, K = the largest number of scores >= 0 over
         the layer's heads, and each head keeps its K best-scored tokens (some may score < 0);
       * `per_head`: each head keeps exactly its tokens scored >= 0 (heads then differ in length
         and the shorter ones are padded).
     Either way the all-zero policy (the first CMA-ES mean) keeps everything, and the newest
     token always stays.

The backward mask (lower triangle masked) is a causal mask over the reversed sequence, so the
BAM runs as SDPA's `is_causal` kernel on the flipped tokens; the cache's left padding lands at the
end of the flipped sequence, where no valid token looks.

Differences from the reference, deliberate:
  * K is taken per batch row (the reference takes the maximum over the rows of its batch too, so
    a prompt's cache would depend on the prompts batched with it; it evolves with batch 1);
  * the feature statistics are measured once on the full cache, not updated online during the
    first iteration; attention weights feed the features in float32 (the reference: bfloat16);
  * the spectrogram is computed as a windowed-DFT matrix product, not `torch.stft` (equal,
    tested).

Policy file (`torch.save`, read with `weights_only=True`), version 2:

    {"format": "longcpt-namm", "version": 2,
     "spec": {"scorer", "selection", "n_fft", "hop", "ema", "recency_dim", "recency_max_freq",
              "hidden", "update_every"},
     "params": float32 (P,), "feature_mean": (n_fft/2+1,), "feature_std": (n_fft/2+1,),
     "info": {...}}          # free-form: generation, fitness, kv_kept, model, ...

Shapes: B batch, Hk KV heads, S cached tokens, t new queries, F frames, K = n_fft/2 + 1
frequencies, E features per token, H scorer hidden size, N = B * Hk scorer sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from longcpt.errors import LongcptError
from longcpt.model.attention import POSITIVE_INT, Constraint, KindHooks, Option, optional, register
from longcpt.model.attention.evict import EvictingAttention, EvictingCache

POLICY_FORMAT = "longcpt-namm"
POLICY_VERSION = 2
SCORERS = ("bam", "mlp")
SELECTIONS = ("reference", "per_head")
EMA = "namm_ema"  # per-entry EMA of the spectrogram (B, Hk, S, K)
TAIL = "namm_tail"  # per-entry last n_fft - hop attention values of the last finished frame (B, Hk, S, n_fft - hop)
PARTIAL = "namm_partial"  # attention rows of the frame being filled, fewer than hop (cache.scratch)
_FOLD_TOKENS = 256  # cached tokens per spectrogram block (their frames fit in a CPU cache; bounded memory)


@dataclass(frozen=True)
class NammSpec:
    """The architecture of a NAMM: everything needed to read its flat parameter vector."""

    scorer: str = "bam"
    selection: str = "reference"
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
        if self.scorer == "bam":  # the attention's output is [r, m], twice the feature width
            return [("qkv.weight", (3 * h, e)), ("qkv.bias", (3 * h,)), ("o.weight", (2 * e, h)), ("o.bias", (2 * e,)),
                    ("out.weight", (e,)), ("out.bias", (1,))]
        return [("fc.weight", (e, e)), ("fc.bias", (e,)), ("out.weight", (e,)), ("out.bias", (1,))]

    def param_count(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes())

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when usable)."""
        problems = []
        if self.scorer not in SCORERS:
            problems.append(f"scorer={self.scorer!r}: must be one of {', '.join(SCORERS)}")
        if self.selection not in SELECTIONS:
            problems.append(f"selection={self.selection!r}: must be one of {', '.join(SELECTIONS)}")
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
    # With a dict: every update adds the sums of the features it sees ("sum", "sumsq", "count"),
    # as `longcpt namm train` measures the normalisation on a full-cache pass.
    feature_sums: dict[str, Any] | None = None

    def to_(self, device: torch.device | str) -> NammPolicy:
        """Move the parameters and statistics to `device`, in place (every layer shares the object)."""
        self.params = self.params.to(device)
        self.feature_mean, self.feature_std = self.feature_mean.to(device), self.feature_std.to(device)
        return self

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
        why = (" (version 1 policies had a residual-only BAM and per-head selection; the scorer is now the "
               "reference's)") if data.get("version") == 1 else ""
        raise LongcptError(f"policy {source}: format version {data.get('version')!r}; this longcpt reads version "
                           f"{POLICY_VERSION}{why} (retrain it, or use the longcpt version that wrote it)")
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
    return_complex=True).abs().transpose(-1, -2)` (tests/model/test_namm.py); `frame_magnitudes`
    does the work.
    """
    return frame_magnitudes(signal.unsqueeze(-1), n_fft, hop).squeeze(-1)


def frame_magnitudes(signal: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """|DFT| of the Hann-windowed frames of S signals laid out along dim -2: (..., L, S) -> (..., F, K, S).

    Frame f covers values f*hop .. f*hop + n_fft - 1 of each signal (one per cached token, as
    the attention rows come: no transpose). A 32-point DFT is cheaper as one matmul (windowed
    cosine and sine tables) than as an FFT followed by the magnitude of complex numbers, and the
    magnitude is square + add + sqrt in place (`hypot` is slower).
    """
    k = n_fft // 2 + 1
    table = dft_table(n_fft, signal.dtype, signal.device).T  # (2K, n_fft): [cos | sin] rows, window included
    parts = table @ signal.unfold(-2, n_fft, hop).transpose(-1, -2)  # (..., F, 2K, S)
    parts.square_()
    return (parts[..., :k, :] + parts[..., k:, :]).sqrt_()  # (..., F, K, S)


@functools.lru_cache(maxsize=16)
def dft_table(n_fft: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Hann-windowed real-DFT table [cos | sin] (n_fft, 2K), built once per device and dtype: a
    frame times it gives the real and (minus) imaginary parts of its spectrum."""
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * n[:, None] * k[None, :] / n_fft  # (n_fft, K)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)[:, None]
    return torch.cat([window * angle.cos(), window * angle.sin()], dim=1).to(device, dtype)


@functools.lru_cache(maxsize=64)
def ema_frame_weights(frames: int, ema: float, hop: int, device: torch.device) -> torch.Tensor:
    """Weight (1 - a) a^(F-1-f) of frame f in the EMA (a = ema^hop), oldest frame first: (F,)."""
    a = ema**hop
    exponents = torch.arange(frames - 1, -1, -1, dtype=torch.float64)
    return ((1 - a) * a**exponents).float().to(device)


def ema_update(previous: torch.Tensor | None, spectrogram: torch.Tensor, ema: float, hop: int) -> torch.Tensor:
    """The EMA after F more frames: previous (..., K) * ema^(F hop) + weighted frames (..., F, K)
    (F steps of e <- a e + (1 - a) x with a = ema^hop)."""
    frames = spectrogram.shape[-2]
    w = ema_frame_weights(frames, ema, hop, spectrogram.device)  # (F,)
    new = w @ spectrogram  # (..., K)
    return new if previous is None else previous * ema ** (frames * hop) + new


def fold_attention(cache: EvictingCache, rows: torch.Tensor, spec: NammSpec) -> None:
    """Fold the attention `rows` (B, Hk, t, S) of t new queries into every cached token's EMA.

    Per token, `cache.extra[TAIL]` holds the last n_fft - hop values of the last finished frame
    (zero for a token newer than them: causal attention gave it nothing). Every frame the new
    queries finish is transformed and folded into `cache.extra[EMA]` at once; the rows of the
    frame still being filled (fewer than hop) wait in `cache.scratch[PARTIAL]`. Updates fall on
    frame ends, so nothing is waiting when the cache is compacted.
    """
    b, hk, t, s = rows.shape
    carry, hop = spec.n_fft - spec.hop, spec.hop
    if EMA not in cache.extra:  # the first block: nothing folded yet
        cache.extra[EMA] = rows.new_zeros(b, hk, s, spec.frequencies)
        cache.extra[TAIL] = rows.new_zeros(b, hk, s, carry)
    partial = cache.scratch.setdefault(PARTIAL, [])  # each (B, Hk, t', S at the time)
    filled = sum(p.shape[2] for p in partial)
    frames = (filled + t) // hop
    if not frames:
        partial.append(rows)
        return
    if partial:  # tokens that arrived since a waiting row was computed got nothing from it
        rows = torch.cat([F.pad(p, (0, s - p.shape[-1])) for p in partial] + [rows], dim=2)  # (B, Hk, filled + t, S)
    done = frames * hop  # rows inside finished frames
    ema, tail = cache.extra[EMA], cache.extra[TAIL]  # (B, Hk, S, K), (B, Hk, S, carry)
    carried = tail.transpose(-1, -2)  # (B, Hk, carry, S), a view
    weights = ema_frame_weights(frames, spec.ema, hop, rows.device)  # (F,)
    acc = ema.transpose(-1, -2) * spec.ema ** done  # (B, Hk, K, S): the old EMA, decayed
    for j in range(0, s, _FOLD_TOKENS):  # a block's frames stay in the CPU's cache through every pass
        signal = torch.cat([carried[..., j : j + _FOLD_TOKENS], rows[:, :, :done, j : j + _FOLD_TOKENS]], dim=2)
        acc[..., j : j + _FOLD_TOKENS] += torch.einsum(
            "f,bhfks->bhks", weights, frame_magnitudes(signal, spec.n_fft, hop))  # (B, Hk, K, s')
    ema.copy_(acc.transpose(-1, -2))
    if carry:  # the next frame starts with the last n_fft - hop values of [carried | new rows]
        last = rows[:, :, done - carry : done] if done >= carry else torch.cat([carried, rows[:, :, :done]], dim=2)
        tail.copy_(last[:, :, -carry:].transpose(-1, -2))
    cache.scratch[PARTIAL] = [rows[:, :, done:].clone()] if rows.shape[2] > done else []


def recency_embedding(age: torch.Tensor, dim: int, max_freq: float) -> torch.Tensor:
    """Sinusoidal embedding of integer ages (...,) -> (..., dim): [sin(age w_i), cos(age w_i)]."""
    half = dim // 2
    freqs = 1.0 / max_freq ** (torch.arange(half, dtype=torch.float64, device=age.device) / max(half, 1))
    angles = age.double()[..., None] * freqs  # (..., dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def token_features(cache: EvictingCache, ema: torch.Tensor, policy: NammPolicy) -> torch.Tensor:
    """Scorer input (B, Hk, S, E): recency embedding, then the normalised EMA spectrogram."""
    spec = policy.spec
    newest = cache.pos[..., -1:]  # (B, Hk, 1): the newest token sits in the last slot
    age = newest - cache.pos  # (B, Hk, S)
    normalised = (ema - policy.feature_mean) / policy.feature_std.clamp_min(1e-7)
    if spec.recency_dim == 0:
        return normalised
    return torch.cat([recency_embedding(age, spec.recency_dim, spec.recency_max_freq), normalised], dim=-1)


# ----------------------------------------------------------------------------------------------
# Scorers: flat parameters -> one score per token; selection: scores -> keep mask.


def backward_attention(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One-head attention over x (N, S, E) where token i sees tokens j >= i (itself and newer).

        keys     0 1 2 3
        token 0  x x x x
        token 1  . x x x
        token 3  . . . x          (the "backward" mask: tril(-1) masked)

    Runs as a causal SDPA over the reversed sequence. Returns the o-projection output (N, S, O).
    """
    h = w["qkv.weight"].shape[0] // 3
    qkv = F.linear(x.flip(1), w["qkv.weight"], w["qkv.bias"])  # (N, S, 3H), newest token first
    q, k, v = qkv.unsqueeze(1).split(h, dim=-1)  # each (N, 1, S, H): one head
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1).flip(1)  # (N, S, H)
    return F.linear(y, w["o.weight"], w["o.bias"])


def score_tokens(features: torch.Tensor, policy: NammPolicy) -> torch.Tensor:
    """Scores (B, Hk, S) of the features (B, Hk, S, E) under `policy`'s scorer."""
    b, hk, s, e = features.shape
    x = features.reshape(b * hk, s, e)  # (N, S, E)
    w = {name: t.to(x.device, x.dtype) for name, t in policy.weights().items()}  # no copy once on the device
    if policy.spec.scorer == "bam":
        r, m = backward_attention(x, w).chunk(2, dim=-1)  # each (N, S, E)
        x = x * (1 + m) + r
    else:
        x = x + F.relu(F.linear(x, w["fc.weight"], w["fc.bias"]))
    return (x @ w["out.weight"] + w["out.bias"]).view(b, hk, s)


def keep_mask(scores: torch.Tensor, valid: torch.Tensor, selection: str) -> torch.Tensor:
    """Which cached tokens stay (B, Hk, S), from their scores (B, Hk, S) and validity.

    `per_head`: a head keeps its tokens scored >= 0. `reference`: every head of a row keeps the
    same number K = the largest count of scores >= 0 over the row's heads, its K best-scored
    tokens. The newest token counts as kept in both (the cache keeps it whatever the mask says).
    """
    s = scores.masked_fill(~valid, float("-inf"))
    s[..., -1] = float("inf")
    if selection == "per_head":
        return s >= 0
    k = (s >= 0).sum(-1).amax(-1)  # (B,)
    order = s.argsort(dim=-1, descending=True, stable=True)  # (B, Hk, S)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return rank < k[:, None, None]


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
    hooks=KindHooks(telemetry=("kept_fraction", "cache_use")),
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
        if self.policy.params.device != weights.device:
            self.policy.to_(weights.device)  # once: every layer shares the policy object
        fold_attention(cache, weights, self.policy.spec)  # (B, Hk, t, S)

    def select(self, cache: EvictingCache) -> torch.Tensor:
        ema = cache.extra[EMA]  # every frame is folded: updates fall on frame ends
        if self.policy.feature_sums is not None:
            _add_feature_sums(self.policy.feature_sums, ema[cache.valid])
        scores = score_tokens(token_features(cache, ema, self.policy), self.policy)  # (B, Hk, S)
        return keep_mask(scores, cache.valid, self.policy.spec.selection)


def _add_feature_sums(sums: dict[str, Any], ema: torch.Tensor) -> None:
    """Add the features (tokens, K) of one update to `sums` (float64, on the host)."""
    ema = ema.double()
    sums["sum"] = sums.get("sum", 0.0) + ema.sum(0).cpu()
    sums["sumsq"] = sums.get("sumsq", 0.0) + ema.pow(2).sum(0).cpu()
    sums["count"] = sums.get("count", 0) + ema.shape[0]
