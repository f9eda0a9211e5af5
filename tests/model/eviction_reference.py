"""Brute-force evictions for the tests: query by query, loop by loop, no code of `evict.py`/`namm.py`.

`run_model` reads a prompt through an evicting model in calls that end at its updates and records,
per layer, the queries, keys and values its attention received (rotated) and the positions each
(row, KV head) kept after each update. `simulate` replays one layer's q/k/v: every query attends to
the tokens it can see (kept so far, or newer than the last update, up to itself) in one dense
float64 softmax, averaged over the query heads of its KV head, and at each update a `select`
function picks the positions to keep from the whole history of attention weights.
"""

from __future__ import annotations

import math

import torch


def run_model(model, ids: torch.Tensor, every: int):
    """Read `ids` (B, T) through `model` in calls of `every` tokens.

    Returns:
        (inputs, kept): inputs[layer] = (q, k, v) rotated, (B, H, T, D) each; kept[layer] = one entry
        per update, [[positions kept by row b, KV head h] ...] (sorted lists).
    """
    from longcpt.model.generation import forward_chunks

    cores = [layer.self_attn.core for layer in model.model.layers]
    seen: dict[int, list] = {i: [] for i in range(len(cores))}
    hooks = [core.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(args[3].rotate(args[0], args[1])
                                                                                  + (args[2],)))
             for i, core in enumerate(cores)]
    kept: dict[int, list] = {i: [] for i in range(len(cores))}
    state: dict = {}
    try:
        with torch.no_grad():
            for offset, _ in forward_chunks(model, ids, state, every):
                if (offset + every) % every == 0 and offset + every <= ids.shape[1]:
                    for i in range(len(cores)):
                        cache = state[i]
                        kept[i].append([[cache.pos[b, h][cache.valid[b, h]].tolist() for h in range(cache.pos.shape[1])]
                                        for b in range(cache.pos.shape[0])])
    finally:
        for hook in hooks:
            hook.remove()
    inputs = {i: tuple(torch.cat([call[j] for call in calls], 2) for j in range(3)) for i, calls in seen.items()}
    return inputs, kept, state


def simulate(q, k, v, every: int, select):
    """Brute-force eviction of one layer.

    Args:
        q: (B, Hq, T, D) rotated queries; k, v: (B, Hk, T, D) rotated keys and values.
        every: tokens between updates (after positions every-1, 2*every-1, ...).
        select: (kept, weights, last) -> new kept, where kept[b][h] lists the cached positions,
            weights (B, Hk, T, T) float64 holds A[b, h, query, key] so far (mean over the KV head's
            query heads, 0 where the key was not visible) and last is the update's position.

    Returns:
        (per update: kept[b][h] after it, the attention weights (B, Hk, T, T)).
    """
    b, hq, t, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    q, k = q.double(), k.double()
    weights = torch.zeros(b, hk, t, t, dtype=torch.float64)
    kept = [[[] for _ in range(hk)] for _ in range(b)]
    history = []
    for p in range(t):
        for bi in range(b):
            for h in range(hk):
                kept[bi][h].append(p)
                keys = torch.tensor(kept[bi][h])
                for head in range(h * g, (h + 1) * g):
                    logits = (k[bi, h, keys] @ q[bi, head, p]) / math.sqrt(d)
                    weights[bi, h, p, keys] += torch.softmax(logits, 0) / g
        if (p + 1) % every == 0:
            kept = select(kept, weights, p)
            history.append([[list(x) for x in row] for row in kept])
    return history, weights
