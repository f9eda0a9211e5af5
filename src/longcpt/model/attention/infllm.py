"""`infllm`: InfLLM, a training-free context memory (Xiao et al. 2024, arXiv 2402.04617).

Any softmax model reads a stream of any length with bounded attention work. Every layer keeps:

    position:  0 ...... n_init | block 0 | block 1 | ... | block N-1 | pending: remainder | window
               sinks (device)  |  memory blocks (host store)         | (device)
                                                                          last n_local tokens

  * sinks: the first `n_init` tokens, kept for good;
  * the local window: the last `n_local` tokens;
  * memory blocks: every `block_size` tokens that leave the window (after the sinks are full) form a
    block; its keys and values go to the host store, with `repr_topk` representative keys;
  * pending: tokens after the last block. The last n_local of them are the window; the older ones
    (fewer than `block_size` + one chunk) wait to fill the next block and stay visible meanwhile.

The input is read in steps of `exc_block_size` queries (each model call is cut into such steps
from its first token, like the reference's `ContextManager.append`). One step:

  1. Local attention: each query sees the keys of the last n_local positions (itself included), at
     their true relative distances: window keys are stored un-rotated and rotated when read, with
     positions 0 .. W-1 inside the window slice, so a stream of any length never needs a position
     beyond n_local + exc_block_size.
  2. Retrieval: the mean of the step's memory queries scores every stored block by the dot product
     with its representatives, summed over query heads (one selection per row, shared by all
     heads); the `topk` best blocks are gathered (all of them while there are at most topk).
  3. Memory attention over [sinks | retrieved blocks | pending tokens outside the query's window].
     Every memory token sits at the same relative distance n_local - 1 from every query (the
     farthest distance of the window): the query is rotated by that one angle, the memory keys by
     angle 0. (The reference takes row n_local - 1 of its table in
     `apply_rotary_pos_emb_one_angle(q, n_local)`.)
  4. One softmax over window and memory: the two partial attentions are merged exactly through
     their log-sum-exp (`merge_attention`). The step's queries are attended in tiles of
     `QUERY_TILE`, so that the masked corners (keys a query's window or memory does not reach yet)
     stay small; the retrieval is still one per step.
  5. Scores: every window key accumulates the attention probability it received from the step's
     queries (from the joint softmax, per query head). When its block forms, the representative of
     query head h is the mean of the keys of the `repr_topk` tokens with the highest score for h
     (keys of h's KV head): with GQA each query head of a KV group has its own representative.
  6. Eviction: tokens that leave the window fill the sinks first, then form whole blocks.

Storage: the sinks, the pending tokens and their scores stay on the compute device (bounded:
n_init + n_local + block_size + exc_block_size tokens), and so do the block representatives
(`Representatives`, one D-vector per query head per block: they grow with the stream, by
Hq * D / block_size values per token, and retrieval scans them where the queries are, as the
reference does). Only the block keys and values go to host memory (`BlockStore`, growing linearly
with the stream). On an accelerator an LRU cache of `max_cached_block` blocks per row
(`BlockCache`) keeps recently retrieved blocks on the device, filled through a small pinned
staging buffer; on a CPU the host is the device and blocks are read in place.

Generation runs a prompt's last token as a step of its own (`longcpt.model.generation.prefill`),
as the reference's does, so the query that predicts the first answer token retrieves its own
blocks rather than sharing the mean query of a step of up to `exc_block_size` prompt tokens.

Differences from the reference (thunlp/InfLLM), all deliberate:
  * memory during a multi-query step is masked per query: a pending token is memory for a query
    only once it has left *that* query's window. The released reference gives every query of a
    step the memory of the step's last query, so the step's earlier queries see up to
    exc_block_size - 1 tokens twice in one softmax (in the window at their distance and in memory
    at n_local - 1; its open issue #61). This code equals the reference with the fix proposed
    there; decoding (one query per step) is the same in both;
  * batches: every row has its own blocks, retrieval and cache (the reference's generation
    asserts batch 1, `inf_llm/utils/greedy_search.py`);
  * scores are float32 and so are the representatives by default (`repr_dtype`: "bfloat16"
    halves them); the reference keeps both in the model dtype, so near-ties can break differently;
  * the memory keys are rotated by angle 0 instead of left alone, which is the same thing unless
    the RoPE type scales cos/sin (YaRN's attention factor then applies to memory scores too);
  * host pages are never pinned; the reference pins them when asked (`pin_memory`, off by
    default), here a bounded staging buffer is pinned instead;
  * `max_cached_block >= topk` is required, which refuses the reference's
    `config/mistral-inf-llm-12k.yaml` (topk 64, max_cached_block 32);
  * not offered: the reference's per-head retrieval (`perhead`), retrieval computed ahead for
    several steps at once (`chunk_topk_calc`), the `lru-s` cache strategy and faiss search (all
    off in its configurations; the last two change no result).
Within n_local tokens nothing leaves the window and `infllm` equals `full` attention.

Shapes: B batch, Hq query heads, Hk KV heads, G = Hq / Hk, D head dim, c queries of a step,
W window keys, L pending tokens, M memory keys, S block_size, N stored blocks, k retrieved blocks.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

import torch
from torch import nn

from longcpt.errors import LongcptError
from longcpt.model.attention import NON_NEGATIVE_INT, POSITIVE_INT, KindHooks, Option, one_of, register
from longcpt.model.rope import rotate

# The reference's defaults for Mistral-7B (config/mistral-inf-llm.yaml).
OPTIONS = {
    "n_init": Option(128, NON_NEGATIVE_INT, "initial tokens kept for good (attention sinks)"),
    "n_local": Option(4096, POSITIVE_INT, "local window: the last n_local tokens, at their relative positions"),
    "block_size": Option(128, POSITIVE_INT, "tokens per memory block"),
    "topk": Option(16, POSITIVE_INT, "memory blocks retrieved per step"),
    "repr_topk": Option(4, POSITIVE_INT, "representative keys averaged into each block's retrieval key"),
    "exc_block_size": Option(512, POSITIVE_INT, "queries per step (one retrieval per step)"),
    "max_cached_block": Option(32, POSITIVE_INT, "blocks per row in the LRU cache on an accelerator"),
    "repr_dtype": Option("float32", one_of("float32", "bfloat16"),
                         "dtype of the block representatives (bfloat16 halves their memory and the scan)"),
}
_ROPE_KEY = "infllm_rope"
# Logit of a hidden key: finite, so that a query with no visible key in one part stays NaN-free.
MASKED = -1e30
# Queries attended together: a step of c queries is cut into tiles of this many, so that the
# masked corners (keys a query's window or memory does not reach yet) stay small.
QUERY_TILE = 128
# Recent steps whose visibility is kept for `visible_share` (covers a prompt's last token and a
# short answer).
LOG_STEPS = 32
# Blocks per page of the host store: it grows a page at a time, never copying what it holds.
PAGE_BLOCKS = 64
# Blocks per page of representatives on the device; a new page starts with room for
# REPS_FIRST_BLOCKS and doubles until full.
REPS_PAGE_BLOCKS = 4096
REPS_FIRST_BLOCKS = 64
# Window masks kept per layer state (a long stream reuses one per query tile).
MASK_CACHE = 16


def infllm_option_problems(o: dict[str, Any]) -> list[str]:
    """Problems across `infllm` options (each alone is checked by its constraint)."""
    problems = []
    if o["n_local"] < o["exc_block_size"]:
        problems.append(f"n_local={o['n_local']} is smaller than exc_block_size={o['exc_block_size']}: the queries "
                        "of one step must fit in the window (raise n_local or lower exc_block_size)")
    if o["repr_topk"] > o["block_size"]:
        problems.append(f"repr_topk={o['repr_topk']} exceeds block_size={o['block_size']}: a block has only "
                        "block_size keys to choose representatives from (lower repr_topk)")
    if o["max_cached_block"] < o["topk"]:
        problems.append(f"max_cached_block={o['max_cached_block']} is smaller than topk={o['topk']}: the device "
                        "cache must hold the blocks of one retrieval (raise max_cached_block or lower topk)")
    return problems


# ----------------------------------------------------------------------------------------------
# Pure functions: layout, representatives, retrieval, softmax pieces and their merge.


def layout(length: int, n_init: int, n_local: int, block_size: int) -> tuple[int, int]:
    """(sinks, blocks) after `length` tokens: the first tokens to leave the window fill the sinks,
    then whole blocks form while at least n_local tokens remain behind them.

    Example: n_init=2, n_local=4, block_size=3, length=12 -> (2, 2): sinks 0-1, blocks 2-4 and 5-7,
    pending 8-11 (the window). The result does not depend on how the stream was chunked.
    """
    sinks = min(n_init, max(0, length - n_local))
    return sinks, max(0, length - sinks - n_local) // block_size


def block_representatives(keys: torch.Tensor, scores: torch.Tensor, repr_topk: int) -> torch.Tensor:
    """Retrieval keys of blocks: per query head, the mean key of its `repr_topk` best-scored tokens.

    Args:
        keys: (B, Hk, N, S, D) un-rotated keys of N blocks.
        scores: (B, Hq, N, S) attention each token received from each query head in the window.
        repr_topk: tokens averaged per block and head.

    Returns:
        (B, N, Hq, D) float32; query head h uses the keys of its KV head h // G.
    """
    b, hk, n, s, d = keys.shape
    hq = scores.shape[1]
    g = hq // hk
    top = scores.topk(repr_topk, dim=-1).indices  # (B, Hq, N, r)
    index = top.view(b, hk, g, n, repr_topk, 1).expand(b, hk, g, n, repr_topk, d)
    grouped = keys.unsqueeze(2).expand(b, hk, g, n, s, d)  # (B, Hk, G, N, S, D), a view
    picked = torch.gather(grouped, 4, index)  # (B, Hk, G, N, r, D)
    return picked.float().mean(4).reshape(b, hq, n, d).transpose(1, 2)  # (B, N, Hq, D)


def retrieval_scores(reps: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Scores (B, N) of blocks: sum over query heads h of <query[b, h], reps[b, n, h]>.

    Args:
        reps: (B, N, Hq, D) float32 representatives.
        query: (B, Hq, D) float32 mean memory query of a step.
    """
    b, n = reps.shape[:2]
    return torch.bmm(reps.reshape(b, n, -1), query.reshape(b, -1, 1)).squeeze(-1)  # (B, N)


def top_blocks(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices (B, min(topk, N)) of the best-scored blocks, ascending; every block when N <= topk
    (as the reference does)."""
    b, n = scores.shape
    if n <= topk:
        return torch.arange(n, device=scores.device).expand(b, n)
    return scores.topk(topk, dim=-1).indices.sort(dim=-1).values


def retrieve_topk(reps: torch.Tensor, query: torch.Tensor, topk: int) -> torch.Tensor:
    """The `topk` blocks whose representatives reps (B, N, Hq, D) best match query (B, Hq, D)."""
    return top_blocks(retrieval_scores(reps, query), topk)


def softmax_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of float logits `s` and its log-sum-exp (each (..., W) and (...)).

    Hidden keys carry the logit `MASKED` (finite): a row with every key hidden then gets
    lse ~ MASKED and drops out of a merge instead of turning into NaN. The log-sum-exp comes from
    the softmax itself, lse = max(s) - log(max(p)) (the largest probability is >= 1/W), which saves
    a pass of exponentials over the score matrix.
    """
    p = torch.softmax(s, dim=-1)
    return p, s.amax(-1) - p.amax(-1).log()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of q (B, Hq, c, D) over grouped k/v (B, Hk, W, D) with an additive mask.

    Args:
        bias: (c, W) float32 (or broadcastable to it), 0 where a query sees a key and `MASKED`
            where it does not.

    Returns:
        (out (B, Hq, c, D), lse (B, Hq, c), probabilities (B, Hq, c, W)), all float32.
    """
    b, hq, c, d = q.shape
    hk, w = k.shape[1], k.shape[2]
    g = hq // hk
    # Repeat the (few) keys over their query heads rather than the (many) scores over the group.
    k = k[:, :, None].expand(b, hk, g, w, d).reshape(b * hq, w, d).float()
    v = v[:, :, None].expand(b, hk, g, w, d).reshape(b * hq, w, d).float()
    s = torch.baddbmm(bias[None], q.reshape(b * hq, c, d).float(), k.transpose(1, 2), alpha=scale)  # (B*Hq, c, W)
    p, lse = softmax_lse(s)
    return torch.bmm(p, v).view(b, hq, c, d), lse.view(b, hq, c), p.view(b, hq, c, w)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over several key sets from their partial attentions.

    Part i attended its keys alone: output o_i (..., T, D) and log-sum-exp lse_i (..., T). Over the
    union of the keys, lse = log sum_i exp(lse_i) and o = sum_i exp(lse_i - lse) o_i. A part with
    no visible key for a query (lse ~ `MASKED`) gets weight 0 there; at least one part must see a
    key (the window always does: the query itself).

    Returns:
        (o, lse) over all parts.
    """
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    out = sum(o * torch.exp(part_lse - lse).unsqueeze(-1) for o, part_lse in parts)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Storage: blocks in host memory, and the LRU cache of blocks on the device.


class Representatives:
    """Retrieval keys of the stored blocks, on the compute device: (B, N, Hq, D) in pages.

    A page holds up to `REPS_PAGE_BLOCKS` blocks. The newest page starts small and doubles its
    capacity as blocks arrive (copying only itself), so a short stream does not reserve a whole
    page per layer and a long one never copies what the full pages hold; a retrieval is one matrix
    product per page, on the device, as the reference does (`VectorTensor`).
    """

    def __init__(self, batch: int, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (batch, n_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.pages: list[torch.Tensor] = []  # each (B, capacity, Hq, D); all full but the last
        self.n = 0

    def append(self, reps: torch.Tensor) -> None:
        """Add the representatives (B, n, Hq, D) of n new blocks."""
        reps = reps.to(self.device, self.dtype)
        done = 0
        while done < reps.shape[1]:
            held = self.n - (len(self.pages) - 1) * REPS_PAGE_BLOCKS if self.pages else REPS_PAGE_BLOCKS
            if held == REPS_PAGE_BLOCKS:  # the last page is full (or there is none): a new small page
                self.pages.append(self._page(REPS_FIRST_BLOCKS))
                held = 0
            page = self.pages[-1]
            take = min(reps.shape[1] - done, REPS_PAGE_BLOCKS - held)
            if held + take > page.shape[1]:  # grow the last page: double its capacity, up to a page
                capacity = min(REPS_PAGE_BLOCKS, max(2 * page.shape[1], held + take))
                grown = self._page(capacity)
                grown[:, :held] = page[:, :held]
                self.pages[-1] = page = grown
            page[:, held : held + take] = reps[:, done : done + take]
            done += take
            self.n += take

    def _page(self, capacity: int) -> torch.Tensor:
        b, hq, d = self.shape
        return torch.empty(b, capacity, hq, d, dtype=self.dtype, device=self.device)

    def all(self) -> torch.Tensor:
        """Every representative (B, N, Hq, D) (a copy; retrieval reads the pages in place)."""
        b, hq, d = self.shape
        if not self.n:
            return torch.empty(b, 0, hq, d, dtype=self.dtype, device=self.device)
        return torch.cat([p[:, : self.n - i * REPS_PAGE_BLOCKS] for i, p in enumerate(self.pages)], dim=1)

    def search(self, query: torch.Tensor, topk: int) -> torch.Tensor:
        """`retrieve_topk` over every stored block for query (B, Hq, D): (B, k) on the device."""
        query = query.to(self.dtype)
        scores = [retrieval_scores(page[:, : self.n - i * REPS_PAGE_BLOCKS], query)
                  for i, page in enumerate(self.pages)]
        return top_blocks(scores[0] if len(scores) == 1 else torch.cat(scores, dim=1), topk)

    def nbytes(self) -> int:
        """Bytes allocated on the device."""
        return sum(p.numel() * p.element_size() for p in self.pages)


class BlockStore:
    """Keys and values of every memory block of one layer in host memory, and their retrieval keys
    on the compute device (`Representatives`).

    Keys and values grow a page of `PAGE_BLOCKS` blocks at a time and nothing held is ever copied
    again. The pages are ordinary (pageable) memory: pinning all of them would lock the whole
    stream's KV in RAM (about 128 GiB at 1M tokens on an 8B model); the block cache copies through
    a small pinned staging buffer instead (`BlockCache`).
    """

    def __init__(self, batch: int, n_heads: int, n_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", reps_dtype: torch.dtype = torch.float32):
        self.shape = (batch, PAGE_BLOCKS, n_kv_heads, block_size, head_dim)
        self.dtype = dtype
        self.pages_k: list[torch.Tensor] = []  # each (B, PAGE_BLOCKS, Hk, S, D), host memory
        self.pages_v: list[torch.Tensor] = []
        self.reps = Representatives(batch, n_heads, head_dim, reps_dtype, torch.device(device))
        self.n = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, reps: torch.Tensor) -> None:
        """Add blocks: k/v (B, n, Hk, S, D) on any device, reps (B, n, Hq, D)."""
        self.reps.append(reps)
        k, v = k.to("cpu"), v.to("cpu")
        for i in range(k.shape[1]):
            page, slot = divmod(self.n, PAGE_BLOCKS)
            if page == len(self.pages_k):
                self.pages_k.append(torch.empty(self.shape, dtype=self.dtype))
                self.pages_v.append(torch.empty(self.shape, dtype=self.dtype))
            self.pages_k[page][:, slot] = k[:, i]
            self.pages_v[page][:, slot] = v[:, i]
            self.n += 1

    def block(self, row: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (Hk, S, D) of block `index` of `row` (host memory)."""
        page, slot = divmod(index, PAGE_BLOCKS)
        return self.pages_k[page][row, slot], self.pages_v[page][row, slot]

    def search(self, query: torch.Tensor, topk: int) -> torch.Tensor:
        """The `topk` blocks (B, k) for query (B, Hq, D), on the representatives' device."""
        return self.reps.search(query, topk)

    def gather(self, selected: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hk, k*S, D) on `device` of the blocks `selected` (B, k) of each row."""
        b, k = selected.shape
        _, _, hk, s, d = self.shape
        out = []
        for pages in (self.pages_k, self.pages_v):
            rows = [torch.stack([pages[i // PAGE_BLOCKS][row, i % PAGE_BLOCKS] for i in indices], dim=1)
                    for row, indices in enumerate(selected.tolist())]  # each (Hk, k, S, D)
            out.append(torch.stack(rows).to(device).view(b, hk, k * s, d))
        return out[0], out[1]

    def nbytes(self) -> int:
        """Bytes of the host pages allocated so far (keys and values)."""
        return sum(p.numel() * p.element_size() for p in (*self.pages_k, *self.pages_v))

    def stored_bytes(self) -> int:
        """Bytes of the blocks stored in host memory. A page is allocated whole but its memory becomes
        resident as blocks fill it, so this, not `nbytes`, is what the store adds to the resident set."""
        b, _, hk, s, d = self.shape
        return self.n * 2 * b * hk * s * d * torch.empty((), dtype=self.dtype).element_size()


class BlockCache:
    """Least-recently-used cache of memory blocks on the compute device, `capacity` per row.

    A fetch marks its blocks used in the order given; a missing block takes a free slot or evicts
    the least recently used block that the same fetch does not ask for (so `capacity` >= k).
    Missing blocks travel host -> device through one staging buffer of `staging` blocks, pinned on
    CUDA so the copy is asynchronous; before the buffer is refilled the previous copy must have
    finished (an event), which bounds the locked memory to the buffer whatever the stream length.

    Attributes:
        hits, misses, evictions: counters over all fetches and rows.
    """

    def __init__(self, store: BlockStore, capacity: int, device: torch.device | str, staging: int | None = None):
        b, _, hk, s, d = store.shape
        device = torch.device(device)
        self.store, self.capacity = store, capacity
        self.k = torch.empty(b, capacity, hk, s, d, dtype=store.dtype, device=device)  # (B, cap, Hk, S, D)
        self.v = torch.empty_like(self.k)
        staging = staging or b * capacity  # at most one fetch's misses: k per row
        pin = device.type == "cuda"
        self.stage = torch.empty(2, staging, hk, s, d, dtype=store.dtype, pin_memory=pin)  # K and V
        self._copied = torch.cuda.Event() if pin else None  # the last staging -> device copy
        self.slots: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(b)]  # block -> slot, LRU first
        self.hits = self.misses = self.evictions = 0

    def fetch(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hk, k*S, D) on the device of the blocks `selected` (B, k)."""
        rows, missing = [], []  # missing: (row, slot, block)
        for row, indices in enumerate(selected.tolist()):
            table, wanted, slots = self.slots[row], set(indices), []
            for index in indices:
                if index in table:
                    self.hits += 1
                    table.move_to_end(index)
                else:
                    self.misses += 1
                    if len(table) < self.capacity:
                        slot = len(table)  # slots are only freed by an eviction that reuses them
                    else:
                        victim = next(i for i in table if i not in wanted)
                        slot = table.pop(victim)
                        self.evictions += 1
                    table[index] = slot
                    missing.append((row, slot, index))
                slots.append(table[index])
            rows.append(slots)
        for at in range(0, len(missing), self.stage.shape[1]):
            self._load(missing[at : at + self.stage.shape[1]])
        b, k = selected.shape
        _, _, hk, s, d = self.k.shape
        slot_index = torch.tensor(rows, device=self.k.device)  # (B, k)
        row_index = torch.arange(b, device=self.k.device)[:, None]
        out_k = self.k[row_index, slot_index].transpose(1, 2)  # (B, Hk, k, S, D)
        out_v = self.v[row_index, slot_index].transpose(1, 2)
        return out_k.reshape(b, hk, k * s, d), out_v.reshape(b, hk, k * s, d)

    def _load(self, missing: list[tuple[int, int, int]]) -> None:
        """Copy blocks (row, slot, block) from the host store into their cache slots."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has left the staging buffer
        m = len(missing)
        for i, (row, _, index) in enumerate(missing):
            bk, bv = self.store.block(row, index)
            self.stage[0, i].copy_(bk)
            self.stage[1, i].copy_(bv)
        moved = self.stage[:, :m].to(self.k.device, non_blocking=True)  # (2, m, Hk, S, D)
        if self._copied is not None:
            self._copied.record()
        row_index = torch.tensor([r for r, _, _ in missing], device=self.k.device)
        slot_index = torch.tensor([s for _, s, _ in missing], device=self.k.device)
        self.k[row_index, slot_index] = moved[0]
        self.v[row_index, slot_index] = moved[1]

    def nbytes(self) -> int:
        """Bytes on the device (the cache slots)."""
        return 2 * self.k.numel() * self.k.element_size()


# ----------------------------------------------------------------------------------------------
# The per-layer state and the attention kind.


class InfLLMState:
    """Everything one layer keeps across calls (see the module docstring for the layout).

    Args:
        options: resolved `infllm` options.
        batch, n_heads, n_kv_heads, head_dim: shapes of the stream.
        dtype, device: of the model's keys and values.
        use_cache: keep the LRU block cache on the device; default: only off the CPU.

    Attributes:
        length: tokens read so far.
        selected: (B, k) blocks retrieved by the last step, or None before any block exists.
    """

    def __init__(self, options: dict[str, Any], batch: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, use_cache: bool | None = None):
        self.options = options
        self.length = 0
        empty = torch.empty(batch, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.sink_k, self.sink_v = empty, empty.clone()  # (B, Hk, <= n_init, D) un-rotated
        self.pend_k, self.pend_v = empty.clone(), empty.clone()  # (B, Hk, L, D) un-rotated
        self.pend_score = torch.empty(batch, n_heads, 0, device=device)  # (B, Hq, L) float32
        device = torch.device(device)
        self.store = BlockStore(batch, n_heads, n_kv_heads, options["block_size"], head_dim, dtype, device,
                                getattr(torch, options["repr_dtype"]))
        use_cache = device.type != "cpu" if use_cache is None else use_cache
        self.cache = (BlockCache(self.store, options["max_cached_block"], device, staging=batch * options["topk"])
                      if use_cache else None)
        self.selected: torch.Tensor | None = None
        self._masks: dict[tuple, torch.Tensor] = {}  # window masks by (offset, queries, keys)
        self._bands: dict[int, torch.Tensor] = {}  # memory mask bands by tile size
        # (first position, queries, sinks, first pending position, selected) of recent steps
        self.log: deque[tuple[int, int, int, int, torch.Tensor | None]] = deque(maxlen=LOG_STEPS)
        # what the last query of the last step attended: (memory mass (B, M), window mass (B, W'),
        # sinks, selected, first pending position, position of the first window key)
        self.last_attention: tuple | None = None

    @property
    def pending_start(self) -> int:
        """Position of the first pending token."""
        return self.length - self.pend_k.shape[2]

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             precision: str) -> torch.Tensor:
        """Attend one step of queries q (B, Hq, c, D) (c <= exc_block_size), then store k/v (B, Hk, c, D).

        Args:
            q, k, v: un-rotated projections of the step's tokens.
            cos, sin: (1, n_local + exc_block_size, D) RoPE tables of positions 0, 1, ...
            precision: the model's rope precision.

        Returns:
            (B, Hq, c, D) attention output in q's dtype.
        """
        o = self.options
        n_local = o["n_local"]
        b, hq, c, d = q.shape
        scale = d**-0.5
        first = self.length  # position of the step's first query
        self.pend_k = torch.cat((self.pend_k, k), dim=2)  # (B, Hk, L, D)
        self.pend_v = torch.cat((self.pend_v, v), dim=2)
        self.pend_score = torch.cat((self.pend_score, self.pend_score.new_zeros(b, hq, c)), dim=2)  # (B, Hq, L)
        start = first + c - self.pend_k.shape[2]  # position of pending[0]
        dev = q.device

        # 1. Local window: pending tokens at positions > first - n_local, rotated at positions 0 .. W-1.
        w0 = max(0, first - n_local + 1 - start)
        w = self.pend_k.shape[2] - w0
        k_win = rotate(self.pend_k[:, :, w0:], cos[:, :w], sin[:, :w], precision)  # (B, Hk, W, D)
        v_win = self.pend_v[:, :, w0:]
        q_win = rotate(q, cos[:, w - c : w], sin[:, w - c : w], precision)  # query i at position W - c + i

        # 2. Retrieval with the step's mean memory query (the query rotated by the one memory angle).
        q_mem = rotate(q, cos[:, n_local - 1 : n_local], sin[:, n_local - 1 : n_local], precision)  # (B, Hq, c, D)
        mem_k, mem_v = [self.sink_k], [self.sink_v]
        self.selected = None
        if self.store.n:
            self.selected = self.store.search(q_mem.float().mean(2), o["topk"])  # (B, k)
            fetch = self.cache.fetch if self.cache is not None else lambda sel: self.store.gather(sel, dev)
            block_k, block_v = fetch(self.selected)
            mem_k.append(block_k)
            mem_v.append(block_v)
        # 3. Memory keys: sinks, retrieved blocks, then pending tokens that left some query's window;
        # every one at angle 0, so at distance n_local - 1 from every query.
        behind = max(0, first + c - n_local - start)
        mem_k.append(self.pend_k[:, :, :behind])
        mem_v.append(self.pend_v[:, :, :behind])
        k_mem = rotate(torch.cat(mem_k, dim=2), cos[:, :1], sin[:, :1], precision)  # (B, Hk, M, D)
        v_mem = torch.cat(mem_v, dim=2)
        fixed = k_mem.shape[2] - behind  # sinks and blocks: seen by every query

        # 4. Attention in tiles of queries (the masked corners of the window and of the pending
        # tokens stay small), window and memory merged into one softmax through their lse.
        outs = []
        for t0 in range(0, c, QUERY_TILE):
            t1 = min(c, t0 + QUERY_TILE)
            a0, a1 = max(0, t0 - n_local + 1 + (w - c)), w - c + t1  # tile's window keys in k_win
            # query i of the tile sits at distance (w - c + t0 - a0) + i - j from window key j
            bias = self._window_mask(w - c + t0 - a0, t1 - t0, a1 - a0, dev)
            o_loc, lse_loc, p_loc = attend(q_win[:, :, t0:t1], k_win[:, :, a0:a1], v_win[:, :, a0:a1], bias, scale)
            parts = [(o_loc, lse_loc)]
            late = max(0, first + t1 - n_local - start)  # pending tokens some query of the tile sees as memory
            if fixed + late:
                # pending token j (position start + j) is memory for query i once it left i's window:
                # j <= (first + t0 - n_local - start) + i; sinks and retrieved blocks are seen by all
                bias = self._memory_mask(first + t0 - n_local - start, t1 - t0, fixed, late, dev)
                m = fixed + late
                o_mem, lse_mem, p_mem = attend(q_mem[:, :, t0:t1], k_mem[:, :, :m], v_mem[:, :, :m], bias, scale)
                parts.append((o_mem, lse_mem))
            out, lse = merge_attention(parts)
            outs.append(out)
            # 5. Attention each window key received, from the joint softmax, summed over queries.
            weight = torch.exp(lse_loc - lse).unsqueeze(2)  # (B, Hq, 1, t)
            self.pend_score[:, :, w0 + a0 : w0 + a1] += (weight @ p_loc).squeeze(2)
            if t1 == c:  # what the step's last query attended, in the joint softmax, mean over heads
                win = (p_loc[:, :, -1] * weight[:, :, 0, -1:]).mean(1)  # (B, a1 - a0)
                mem = (p_mem[:, :, -1] * torch.exp(lse_mem - lse)[:, :, -1:]).mean(1) if fixed + late else None
                self.last_attention = (mem, win, self.sink_k.shape[2], self.selected, start, start + w0 + a0)

        self.log.append((first, c, self.sink_k.shape[2], start, self.selected))
        self.length += c
        self._evict()
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.to(q.dtype)

    def _memory_mask(self, offset: int, t: int, fixed: int, late: int, device: torch.device) -> torch.Tensor:
        """Additive mask (t, fixed + late): the first `fixed` keys visible to every query, then key j
        visible to query i iff j <= offset + i. The second part is a slice of one cached band per
        tile size (offset > -t and late - offset = t, so the slice always fits)."""
        r = self.options["block_size"] + self.options["exc_block_size"] + QUERY_TILE
        if t not in self._bands:
            y = torch.arange(-r, r, device=device)[None]  # column y + r holds j - offset = y
            self._bands[t] = torch.zeros(t, 2 * r, device=device).masked_fill_(
                y > torch.arange(t, device=device)[:, None], MASKED)
        part = self._bands[t][:, r - offset : r - offset + late]  # (t, late)
        if not fixed:
            return part
        return torch.cat((part.new_zeros(1, 1).expand(t, fixed), part), dim=1)

    def _window_mask(self, offset: int, t: int, n: int, device: torch.device) -> torch.Tensor:
        """Additive mask (t, n) where query i sees window key j iff 0 <= offset + i - j < n_local
        (0 = visible, `MASKED` = hidden); cached, since a long stream repeats the same few."""
        key = (offset, t, n)
        if key not in self._masks:
            distance = offset + torch.arange(t, device=device)[:, None] - torch.arange(n, device=device)[None]
            hidden = (distance < 0) | (distance >= self.options["n_local"])
            if len(self._masks) >= MASK_CACHE:
                self._masks.clear()
            self._masks[key] = torch.zeros(t, n, device=device).masked_fill_(hidden, MASKED)
        return self._masks[key]

    def _evict(self) -> None:
        """Move tokens that left the window to the sinks (until full), then into whole blocks."""
        o = self.options
        n_local, size = o["n_local"], o["block_size"]
        pending, n_sinks = self.pend_k.shape[2], self.sink_k.shape[2]
        if n_sinks < o["n_init"] and pending > n_local:
            a = min(o["n_init"] - n_sinks, pending - n_local)
            self.sink_k = torch.cat((self.sink_k, self.pend_k[:, :, :a]), dim=2)
            self.sink_v = torch.cat((self.sink_v, self.pend_v[:, :, :a]), dim=2)
            self._drop(a)
            pending -= a
        n = max(0, pending - n_local) // size
        if n:
            b, hk, _, d = self.pend_k.shape
            keys = self.pend_k[:, :, : n * size].reshape(b, hk, n, size, d)  # (B, Hk, n, S, D)
            values = self.pend_v[:, :, : n * size].reshape(b, hk, n, size, d)
            scores = self.pend_score[:, :, : n * size].reshape(b, -1, n, size)  # (B, Hq, n, S)
            reps = block_representatives(keys, scores, o["repr_topk"])  # (B, n, Hq, D)
            self.store.append(keys.transpose(1, 2), values.transpose(1, 2), reps)
            self._drop(n * size)

    def _drop(self, n: int) -> None:
        self.pend_k, self.pend_v = self.pend_k[:, :, n:], self.pend_v[:, :, n:]
        self.pend_score = self.pend_score[:, :, n:]

    # -- what the state holds -------------------------------------------------------------------

    def device_bytes(self) -> int:
        """Bytes on the compute device that do not grow with the stream: sinks, pending tokens and
        scores, the block cache (the representatives, which do, are `reps_bytes`)."""
        tensors = (self.sink_k, self.sink_v, self.pend_k, self.pend_v, self.pend_score)
        held = sum(t.numel() * t.element_size() for t in tensors)
        return held + (self.cache.nbytes() if self.cache is not None else 0)

    def reps_bytes(self) -> int:
        """Bytes of the block representatives on the compute device (one D-vector per query head per
        block: Hq * D / block_size values per token)."""
        return self.store.reps.nbytes()

    def host_bytes(self, stored: bool = False) -> int:
        """Bytes of the host store's keys and values (grows linearly with the stream): the pages
        allocated, or with `stored` the blocks they hold (the part that is resident)."""
        return self.store.stored_bytes() if stored else self.store.nbytes()

    def kept_fraction(self) -> float:
        """Tokens the last step attended (sinks, retrieved blocks, pending) / tokens read."""
        if not self.length:
            return 1.0
        retrieved = 0 if self.selected is None else self.selected.shape[1] * self.options["block_size"]
        return min(1.0, (self.sink_k.shape[2] + retrieved + self.pend_k.shape[2]) / self.length)

    def visible_share(self, row: int, positions: torch.Tensor, since: int = 0) -> float | None:
        """Share of `positions` (1-D) of `row` that recent steps could attend, averaged over the logged
        steps whose queries reach position `since` (None when no such step is logged).

        A position is visible to a step when it is a sink, pending (window or remainder), or in a
        block the step retrieved. Used to explain passkey results (was the key retrieved?).
        """
        size, shares = self.options["block_size"], []
        positions = torch.as_tensor(positions).cpu()
        for first, c, n_sinks, start, selected in self.log:
            if first + c <= since:
                continue
            seen = (positions < n_sinks) | (positions >= start)
            if selected is not None:
                block = torch.div(positions - n_sinks, size, rounding_mode="floor")
                seen |= (positions >= n_sinks) & torch.isin(block, selected[row].cpu())
            shares.append(seen.float().mean().item())
        return sum(shares) / len(shares) if shares else None

    def attention_on(self, row: int, positions: torch.Tensor) -> float | None:
        """Attention mass the last query of the last step put on `positions` (1-D) of `row`: its
        joint-softmax probabilities over window and memory summed over those keys, mean over
        query heads (None before any step). Memory keys all sit at distance n_local - 1, so a
        visible key may still receive little of the mass; this says how much it did."""
        if self.last_attention is None:
            return None
        mem, win, n_sinks, selected, start, win_first = self.last_attention
        want = torch.as_tensor(positions).cpu()
        total = float(win[row].cpu()[torch.isin(win_first + torch.arange(win.shape[1]), want)].sum())
        if mem is not None:
            size = self.options["block_size"]
            keys = [torch.arange(n_sinks)]
            if selected is not None:
                keys.append((n_sinks + selected[row].cpu()[:, None] * size + torch.arange(size)).flatten())
            late = mem.shape[1] - sum(len(x) for x in keys)
            keys.append(start + torch.arange(late))
            total += float(mem[row].cpu()[torch.isin(torch.cat(keys), want)].sum())
        return total


@register("infllm", options=OPTIONS, positions="arange", trainable=False, inference_memory=True,
          check=infllm_option_problems, hooks=KindHooks(telemetry=("kept_fraction", "visible_share", "attention_on")))
class InfLLMAttention(nn.Module):
    """Sinks + local window + retrieved memory blocks; see the module docstring.

    With `ctx.state` the layer state (`InfLLMState`) lives in `ctx.state[layer_idx]` and a stream
    continues across calls; without it each call reads its rows as whole streams.
    """

    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.options = dict(args.attention_options)

    def forward(self, q, k, v, ctx):
        if ctx.cu_seqlens is not None:
            raise LongcptError("attention kind 'infllm' reads one stream per row and does not take packed "
                               "documents (cu_seqlens); evaluate one document per row")
        b, hq, t, d = q.shape
        state = ctx.state.get(self.layer_idx) if ctx.state is not None else None
        if state is None:
            state = InfLLMState(self.options, b, hq, k.shape[1], d, k.dtype, k.device)
            if ctx.state is not None:
                ctx.state[self.layer_idx] = state
        first = int(ctx.position_ids[0, 0])
        if first != state.length or b != state.pend_k.shape[0]:
            raise LongcptError(
                f"attention kind 'infllm': this call starts at position {first} with {b} rows, but the state "
                f"holds {state.length} tokens of {state.pend_k.shape[0]} rows; pass a fresh state for a new "
                "sequence and positions that continue the old one otherwise")
        cos, sin = self._tables(ctx, q.device)
        size = self.options["exc_block_size"]
        outs = [
            state.step(q[:, :, s : s + size], k[:, :, s : s + size], v[:, :, s : s + size], cos, sin,
                       ctx.rope.precision)
            for s in range(0, t, size)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, Hq, T, D)

    def _tables(self, ctx, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin (1, n_local + exc_block_size, D) of positions 0, 1, ..., once per call."""
        n = self.options["n_local"] + self.options["exc_block_size"]
        if _ROPE_KEY not in ctx.cache:
            ctx.cache[_ROPE_KEY] = ctx.rope(torch.arange(n, device=device)[None])
        return ctx.cache[_ROPE_KEY]
