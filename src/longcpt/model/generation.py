"""Autoregressive generation and chunked (streaming) forward passes with a caller-owned state.

Every model call here is `model.hidden_states(chunk, position_ids=<absolute positions>,
state=state)` (the body of `model(...)` without the LM head, so that a long prompt never
materialises (T, V) logits): the attention cores keep what they need across calls in `state`,
under their layer index. `full` keeps a KV cache (`attention/full.py`); Infini-attention keeps its
compressive memory, so its memory stays bounded however long the input.

A prompt is fed in chunks of `prefill_chunk` tokens (bounded activation memory, and the natural
unit of streaming), all but its last token; the last prompt token then runs as a call of its own,
then one token per step (`prefill`). The separate last token matters to memories that choose what
to attend once per step of queries (InfLLM retrieves blocks with the mean query of a step): the
query that predicts the first answer token then chooses for itself, as InfLLM's reference
generation does (`inf_llm/utils/greedy_search.py`). For every other kind it is the same
computation cut differently. Greedy decoding equals transformers' `generate` with
`do_sample=False` on the same weights (tests/eval/test_generation.py).

Shapes: B batch, T tokens, C hidden size, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

DEFAULT_PREFILL_CHUNK = 4096


def kv_kept(state: dict) -> float | None:
    """Mean share of the KV cache an evicting attention kind kept, over the layers of `state`.

    A layer state that evicts (InfLLM, NAMM, H2O, StreamingLLM) reports its own share through a
    `kept_fraction()` method: entries held for attention / tokens seen, averaged over rows (an
    evicting cache counts the entries of a row's longest KV head, as the NAMM reference counts its
    cache). Returns None when no layer state evicts anything (`full`, Infini-attention).
    """
    shares = [s.kept_fraction() for s in state.values() if hasattr(s, "kept_fraction")]
    return sum(shares) / len(shares) if shares else None


def cache_use(state: dict) -> dict[str, float] | None:
    """What the layer states keep, mean over layers: `kv_kept` (at the end, as `kv_kept`), and for
    evicting caches their size through the sequence: `kv_kept_mean` (the cache each token saw,
    relative to the full cache's) and `kv_peak` (the largest cache / tokens seen); see
    `EvictingCache.cache_use`. None when no layer state evicts anything (`full`: all are 1).
    """
    kept = kv_kept(state)
    if kept is None:
        return None
    uses = [s.cache_use() for s in state.values() if hasattr(s, "cache_use")]
    through = {key: sum(u[key] for u in uses) / len(uses) for key in ("kv_kept_mean", "kv_peak")} if uses else {}
    return {"kv_kept": kept, **through}


def mean_cache_use(uses: list[dict[str, float]]) -> dict[str, float | None]:
    """Mean of `cache_use` results over prompts, key by key (None for a key no prompt reports)."""
    out = {}
    for key in ("kv_kept", "kv_kept_mean", "kv_peak"):
        values = [u[key] for u in uses if key in u]
        out[key] = sum(values) / len(values) if values else None
    return out


def visible_share(state: dict, row: int, positions: torch.Tensor, since: int) -> float | None:
    """Share of `positions` (1-D) of `row` that the last steps could attend, mean over layers.

    A layer state that attends only part of the context (InfLLM: sinks, window, retrieved blocks)
    reports it through `visible_share(row, positions, since)` for its recent steps whose queries
    reach position `since` (e.g. the last prompt token and the answer). Returns None when no layer
    state selects what it attends (`full`, Infini-attention). The passkey evaluation uses it to log
    whether the key was retrieved.
    """
    shares = [s.visible_share(row, positions, since) for s in state.values() if hasattr(s, "visible_share")]
    shares = [x for x in shares if x is not None]
    return sum(shares) / len(shares) if shares else None


def attention_on(state: dict, row: int, positions: torch.Tensor) -> float | None:
    """Attention mass the last query read put on `positions` (1-D) of `row`, mean over layers.

    A layer state that can tell (InfLLM) reports it through `attention_on(row, positions)`: the
    query's softmax probabilities summed over those keys, mean over query heads. Read right after
    `prefill` (the `on_prompt` hook of `generate`), it is the attention the query predicting the
    first new token gave them. Returns None when no layer state reports it.
    """
    masses = [s.attention_on(row, positions) for s in state.values() if hasattr(s, "attention_on")]
    masses = [x for x in masses if x is not None]
    return sum(masses) / len(masses) if masses else None


def forward_chunks(
    model,
    input_ids: torch.Tensor,
    state: dict,
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
    start: int = 0,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Run `input_ids` (B, T) through `model` in chunks, carrying `state` from chunk to chunk.

    Args:
        model: a longcpt `CausalLM` (any attention kind that supports `state`).
        input_ids: (B, T) tokens; rows share positions (no padding).
        state: dict the attention cores fill and read; pass the same one to continue a sequence.
        chunk_size: tokens per model call.
        start: absolute position of `input_ids[:, 0]` (the tokens already in `state`).

    Yields:
        (offset, hidden): the chunk's first index in `input_ids` and its final hidden states
        (B, t, C), before the LM head.
    """
    b, t = input_ids.shape
    for offset in range(0, t, chunk_size):
        chunk = input_ids[:, offset : offset + chunk_size]  # (B, t_c)
        positions = torch.arange(start + offset, start + offset + chunk.shape[1], device=chunk.device)
        hidden = model.hidden_states(chunk, position_ids=positions.expand(b, -1), state=state)  # (B, t_c, C)
        yield offset, hidden


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from `logits` (B, V): argmax when `temperature` is 0, else sample.

    Sampling divides by `temperature`, then keeps the smallest set of most likely tokens whose
    probability reaches `top_p` (nucleus sampling, Holtzman et al. 2019; the most likely token is
    always kept), and draws from the renormalised distribution with `generator`.

    Returns:
        (B,) token ids.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        # Mass strictly before each token: a token is kept while that mass is below top_p.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(
    model,
    input_ids: torch.Tensor,
    state: dict,
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Read a prompt into `state`: all but its last token in chunks, then the last token alone.

    Args:
        model: a longcpt `CausalLM`.
        input_ids: (B, T) prompt tokens, T >= 1; rows share positions (no padding).
        state: an empty dict the attention cores fill.
        chunk_size: tokens per model call before the last token.
        progress: called with the number of tokens read after every model call.

    Returns:
        (B, C) final hidden state of the last prompt token (what predicts the first new token).
    """
    b, t = input_ids.shape
    for _, hidden in forward_chunks(model, input_ids[:, :-1], state, chunk_size):
        if progress is not None:
            progress(hidden.shape[1])
    positions = torch.full((b, 1), t - 1, device=input_ids.device)
    hidden = model.hidden_states(input_ids[:, -1:], position_ids=positions, state=state)  # (B, 1, C)
    if progress is not None:
        progress(1)
    return hidden[:, -1]


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | list[int] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    state: dict | None = None,
    on_prompt: Callable[[dict], None] | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Continue `input_ids` (B, T) by up to `max_new_tokens` tokens.

    Args:
        model: a longcpt `CausalLM`; put in eval mode by the caller.
        input_ids: (B, T) prompt tokens; all rows the same length (no padding).
        max_new_tokens: upper bound on generated tokens.
        temperature: 0 = greedy; > 0 samples (see `sample_next`).
        top_p: nucleus sampling threshold (used when sampling).
        eos_id: token id(s) that end a row; finished rows are filled with the first of them, and
            generation stops once every row has finished.
        prefill_chunk: prompt tokens per model call.
        generator: random generator for sampling (seed it for reproducible samples).
        progress: called with the number of tokens processed after every model call.
        state: an empty dict to fill (the attention cores' state), for callers that inspect it
            afterwards (e.g. `kv_kept`); default a private one.
        on_prompt: called with `state` once the whole prompt is read, before the first token is
            chosen (what the memory attended for that token can be read there; see
            `attention_on`).
        stop: called after every step with the (B, n) tokens generated so far; returns (B,) bool,
            the rows that have finished for another reason than EOS (the lm-evaluation-harness
            backend stops at strings). They are filled like rows that produced EOS.

    Returns:
        (B, N) generated tokens, N <= max_new_tokens (the prompt is not included).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (B, T) tensor, got shape {tuple(input_ids.shape)}")
    eos = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
    state = {} if state is None else state
    last = prefill(model, input_ids, state, prefill_chunk, progress)  # (B, C)
    if on_prompt is not None:
        on_prompt(state)
    position = input_ids.shape[1]
    b = input_ids.shape[0]
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = model.lm_head(last)  # (B, V)
        token = sample_next(logits, temperature, top_p, generator)  # (B,)
        if eos:
            token = torch.where(finished, torch.full_like(token, eos[0]), token)
            finished |= torch.isin(token, torch.tensor(eos, device=token.device))
        out.append(token)
        if stop is not None:
            finished |= stop(torch.stack(out, dim=1)).to(finished.device)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        positions = torch.full((b, 1), position, device=input_ids.device)
        last = model.hidden_states(token[:, None], position_ids=positions, state=state)[:, -1]  # (B, C)
        position += 1
        if progress is not None:
            progress(1)
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(b, 0)
