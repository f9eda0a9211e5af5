"""NAMM and the reference evictions: policy overhead, prefill time and memory (issues 14, 26).

Two measurements, side by side in one run:

1. `--lengths`: one prompt of each length L is read through a small model in chunks
   (`forward_chunks`, the path every evaluation takes) with:
     * `full`: the KV cache keeps everything (SDPA);
     * `namm` with the BAM scorer and with the MLP scorer: evictions every 512 tokens;
     * `h2o` and `streaming` with `cache_size` set so that they keep the same share of the cache as
       NAMM-BAM at the end of the prompt (L is a multiple of 512, so an update ends every prompt).
   It reports prefill seconds (and the ratio to `full`), the memory held at the end (MiB: keys +
   values of every layer with padding slots, plus everything the policy keeps per token: NAMM's
   EMA and attention buffer, H2O's scores), `kv_kept` at the end and through the prompt
   (`kv_kept_mean`), and for NAMM the policy's own time (folding the attention into the EMA, and
   features + scorer + selection at each update) per 512-token update, as a share of the rest of
   the prefill.
   Model: a small Llama (4 layers, 256 wide, 8 heads / 4 KV heads, head dim 32, vocab 8192),
   random weights. Policy: `--policy FILE` (a NAMM reads only attention, so it applies to any
   model), else a synthetic one that keeps a token while the DC part of its attention spectrogram
   is above the median a keep-all pass sees (the cost does not depend on the weights, only on the
   tokens kept).

2. `--layer-sizes`: one Llama-3-8B-shaped layer (hidden 4096, 32 heads / 8 KV heads, head dim
   128, MLP 14336; vocabulary 256, which changes nothing in the layer) reads one block of 512 new
   tokens on top of S cached tokens (S = 4K, 8K, 16K by default), the block that ends at an
   update: `full` (SDPA over a KV cache) against `namm` (BAM, the all-zero policy: every step runs,
   nothing is evicted, so S stays S), both from the same prepared cache. It reports the block's
   CPU time for each (run with OMP_NUM_THREADS=1: one thread, whose CPU time other jobs on a
   shared machine barely change), the NAMM policy's (fold + update) and the policy / `full` ratio
   (target: <= 15% at 8K), and the whole `namm` block / `full` (its attention is computed
   explicitly in float32 to get the weights, which costs more than SDPA before any policy work).

Run:
    python benchmarks/namm.py                                   # tiny model at 4K, 16K, 32K; 8B layer at 4K-16K
    python benchmarks/namm.py --lengths 4096,16384 --quick-kinds --layer-sizes 4096,8192
Prints two tables and one JSON line. Times on a loaded shared machine are noisy: the ratios
compare runs made back to back, and `--reps` repeats each layer measurement (the minimum counts).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import size_label  # noqa: E402

from longcpt.model import CausalLM, ModelArgs  # noqa: E402
from longcpt.model.attention import namm as namm_module  # noqa: E402
from longcpt.model.attention.evict import EvictingCache  # noqa: E402
from longcpt.model.attention.full import KVCache  # noqa: E402
from longcpt.model.attention.namm import NammPolicy, NammSpec, load_policy  # noqa: E402
from longcpt.model.generation import cache_use, forward_chunks  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=1 << 17)
LAYER_8B = dict(vocab_size=256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 15, rope_theta=500000.0)
MIB = 2**20


def build(kind: str, options: dict, weights: dict) -> CausalLM:
    model = CausalLM(ModelArgs(**MODEL, attention=kind, attention_options=options)).eval()
    model.load_state_dict(weights)
    return model


def held_bytes(state: dict) -> tuple[int, int]:
    """(KV bytes, policy bytes) the layer states hold: keys and values (padding slots included; the
    filled part of `full`'s doubling buffer), and every per-token buffer of an evicting policy."""
    kv = policy = 0
    for cache in state.values():
        k, v = cache.k, cache.v
        if isinstance(cache, KVCache):
            kv += 2 * k[:, :, : cache.length].numel() * k.element_size()
            continue
        kv += k.numel() * k.element_size() + v.numel() * v.element_size()
        waiting = [t for x in cache.scratch.values() if isinstance(x, list) for t in x]  # NAMM's unfinished frame
        policy += sum(t.numel() * t.element_size() for t in [*cache.extra.values(), *waiting])
    return kv, policy


def prefill(model: CausalLM, ids: torch.Tensor, chunk: int) -> tuple[float, dict]:
    state: dict = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in forward_chunks(model, ids, state, chunk):
            pass
    return time.perf_counter() - t0, state


class PolicyTimer:
    """Accumulates the time spent in NAMM's `observe` (folding attention into the EMA) and `select`
    (features + scorer + selection at an update), and counts the updates."""

    def __init__(self, clock=time.perf_counter):
        self.seconds, self.calls, self.clock = 0.0, 0, clock
        self._methods = {name: getattr(namm_module.NammAttention, name) for name in ("observe", "select")}

    def __enter__(self):
        timer = self

        def timed(name):
            method = timer._methods[name]

            def run(core, *args):
                t0 = timer.clock()
                out = method(core, *args)
                timer.seconds += timer.clock() - t0
                timer.calls += name == "select"
                return out

            return run

        for name in self._methods:
            setattr(namm_module.NammAttention, name, timed(name))
        return self

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(namm_module.NammAttention, name, method)


def synthetic_policy(scorer: str, weights: dict, probe_len: int) -> NammPolicy:
    """Keep while the DC part of the attention spectrogram is above a keep-all pass's median."""
    policy = NammPolicy.zeros(NammSpec(scorer=scorer))
    policy.weights()["out.bias"].fill_(1.0)
    ids = torch.randint(0, MODEL["vocab_size"], (1, probe_len), generator=torch.Generator().manual_seed(1))
    _, state = prefill(build("namm", {"policy": policy}, weights), ids, 4096)
    policy.feature_mean[0] = torch.cat([c.extra[namm_module.EMA][..., 0].flatten() for c in state.values()]).median()
    policy.weights()["out.bias"].fill_(0.0)
    policy.weights()["out.weight"][policy.spec.recency_dim] = 1.0
    return policy


def tiny_model_rows(lengths: list[int], chunk: int, policy_file: str | None, quick: bool) -> tuple[list, dict]:
    """Measurement 1 (module docstring): rows (label, kind, result) and results by length."""
    torch.manual_seed(0)
    weights = CausalLM(ModelArgs(**MODEL, attention="full")).state_dict()
    scorers = ["bam"] if quick else ["bam", "mlp"]
    policies = {}
    for scorer in scorers:
        if policy_file:
            policies[scorer] = load_policy(policy_file)
            if policies[scorer].spec.scorer != scorer:
                del policies[scorer]
        else:
            policies[scorer] = synthetic_policy(scorer, weights, 2048)
    rows, results = [], {}
    for length in lengths:
        ids = torch.randint(0, MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
        runs = {}
        seconds, state = prefill(build("full", {}, weights), ids, chunk)
        runs["full"] = {"seconds": seconds, "kv_mib": held_bytes(state)[0] / MIB, "policy_mib": 0.0,
                        "kv_kept": 1.0, "kv_kept_mean": 1.0}
        for scorer, policy in policies.items():
            model = build("namm", {"policy": policy}, weights)
            with PolicyTimer() as timer:
                seconds, state = prefill(model, ids, chunk)
            updates = timer.calls // MODEL["num_hidden_layers"]
            kv, held = held_bytes(state)
            runs[f"namm-{scorer}"] = {
                "seconds": seconds, "kv_mib": kv / MIB, "policy_mib": held / MIB, **cache_use(state),
                "policy_seconds": timer.seconds, "policy_share": timer.seconds / (seconds - timer.seconds),
                "policy_ms_per_update": 1000 * timer.seconds / max(updates, 1),
            }
        share = runs[f"namm-{next(iter(policies))}"]["kv_kept"]  # the baselines keep what NAMM kept
        cache_size = max(8, round(share * length))
        for kind, options in (("h2o", {"cache_size": cache_size}), ("streaming", {"cache_size": cache_size})):
            seconds, state = prefill(build(kind, options, weights), ids, chunk)
            kv, held = held_bytes(state)
            runs[kind] = {"seconds": seconds, "kv_mib": kv / MIB, "policy_mib": held / MIB, **cache_use(state)}
        for name, r in runs.items():
            r["vs_full"] = runs["full"]["seconds"] / r["seconds"]
            rows.append((size_label(length), name, r))
        results[str(length)] = runs
        print(f"{size_label(length)} done", file=sys.stderr, flush=True)
    return rows, results


def layer_state(kind: str, cached: int, model: CausalLM, g: torch.Generator) -> dict:
    """A layer state holding `cached` tokens (positions 0 .. cached-1) with random rotated K/V, as
    after a prefill; NAMM's per-token EMA and frame tail random too (their values do not change the
    cost)."""
    args = model.args
    k = torch.randn(1, args.num_key_value_heads, cached, args.head_dim, generator=g)
    v = torch.randn(1, args.num_key_value_heads, cached, args.head_dim, generator=g)
    if kind == "full":
        cache = KVCache()
        cache.append(k, v)  # capacity 2 x cached: the block appends without growing
        return {0: cache}
    cache = EvictingCache()
    cache.append(k, v, torch.arange(cached))
    spec = model.model.layers[0].self_attn.core.policy.spec
    cache.extra[namm_module.EMA] = torch.rand(1, args.num_key_value_heads, cached, spec.frequencies, generator=g)
    cache.extra[namm_module.TAIL] = torch.rand(1, args.num_key_value_heads, cached, spec.n_fft - spec.hop,
                                               generator=g) / cached
    return {0: cache}


def layer_rows(sizes: list[int], reps: int) -> list[dict]:
    """Measurement 2 (module docstring): one 512-token block on an 8B-shaped layer per cache size."""
    torch.manual_seed(0)
    weights = CausalLM(ModelArgs(**LAYER_8B, attention="full")).state_dict()
    policy = NammPolicy.zeros(NammSpec(scorer="bam"))  # keeps everything: every step runs, S stays S
    models = {"full": build_8b("full", {}, weights), "namm": build_8b("namm", {"policy": policy}, weights)}
    out = []
    for cached in sizes:
        g = torch.Generator().manual_seed(cached)
        block = 512
        ids = torch.randint(0, LAYER_8B["vocab_size"], (1, block), generator=g)
        positions = torch.arange(cached, cached + block)[None]
        prepared = {kind: layer_state(kind, cached, m, g) for kind, m in models.items()}
        timer = PolicyTimer(time.process_time)  # CPU time: other processes on the machine barely disturb it
        policy_best = float("inf")
        best = dict.fromkeys(models, float("inf"))
        for _ in range(reps + 1):  # the first round warms up; kinds alternate, so load hits both alike
            for kind, model in models.items():
                state = copy.deepcopy(prepared[kind])  # the same cache every time
                timer.seconds = 0.0
                with timer, torch.inference_mode():
                    t0 = time.process_time()
                    model.hidden_states(ids, position_ids=positions, state=state)
                    seconds = time.process_time() - t0
                best[kind] = min(best[kind], seconds)
                if kind == "namm":
                    policy_best = min(policy_best, timer.seconds)
                    assert state[0].length == cached + block  # nothing evicted: the cost at S
        out.append({"cached": cached, "full_s": best["full"], "namm_s": best["namm"], "policy_s": policy_best,
                    "policy_vs_full": policy_best / best["full"], "namm_vs_full": best["namm"] / best["full"] - 1})
        print(f"8B layer at {size_label(cached)} done", file=sys.stderr, flush=True)
    return out


def build_8b(kind: str, options: dict, weights: dict) -> CausalLM:
    model = CausalLM(ModelArgs(**LAYER_8B, attention=kind, attention_options=options)).eval()
    model.load_state_dict(weights)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,16384,32768", help="tiny-model prompt lengths ('' to skip)")
    parser.add_argument("--chunk", type=int, default=4096, help="prompt tokens per model call")
    parser.add_argument("--policy", default=None, help="a NAMM policy file (default: the synthetic one)")
    parser.add_argument("--quick-kinds", action="store_true", help="skip the MLP scorer")
    parser.add_argument("--layer-sizes", default="4096,8192,16384", help="8B-layer cache sizes ('' to skip)")
    parser.add_argument("--reps", type=int, default=3, help="8B-layer repetitions per size (the minimum counts)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    sizes = [int(x) for x in args.layer_sizes.split(",") if x]
    rows, results = tiny_model_rows(lengths, args.chunk, args.policy, args.quick_kinds) if lengths else ([], {})
    layers = layer_rows(sizes, args.reps) if sizes else []
    if rows:
        print(f"\nprefill of one prompt, chunks of {args.chunk} tokens, evictions every 512 (CPU, "
              f"{torch.get_num_threads()} threads)")
        print(f"{'L':>5} {'kind':<12} {'seconds':>9} {'full/x':>7} {'KV MiB':>8} {'policy MiB':>11} {'kv_kept':>8} "
              f"{'kv_kept_mean':>13} {'policy ms/update':>17} {'policy / rest':>14}")
        for label, name, r in rows:
            policy = (f"{r['policy_ms_per_update']:>17.1f} {100 * r['policy_share']:>13.1f}%" if "policy_share" in r
                      else f"{'':>17} {'':>14}")
            print(f"{label:>5} {name:<12} {r['seconds']:>9.2f} {r['vs_full']:>6.2f}x {r['kv_mib']:>8.2f} "
                  f"{r['policy_mib']:>11.2f} {r['kv_kept']:>8.3f} {r['kv_kept_mean']:>13.3f} {policy}")
    if layers:
        print(f"\none Llama-3-8B-shaped layer, a 512-token block ending at an update on S cached tokens (CPU "
              f"seconds, {torch.get_num_threads()} threads, best of {args.reps})")
        print(f"{'S':>5} {'full s':>8} {'namm s':>8} {'policy s':>9} {'policy / full':>14} {'namm / full - 1':>16}")
        for r in layers:
            print(f"{size_label(r['cached']):>5} {r['full_s']:>8.2f} {r['namm_s']:>8.2f} {r['policy_s']:>9.2f} "
                  f"{100 * r['policy_vs_full']:>13.1f}% {100 * r['namm_vs_full']:>15.1f}%")
    print(json.dumps({"benchmark": "namm", "model": MODEL, "layer": LAYER_8B, "chunk": args.chunk,
                      "results": results, "layer_8b": layers}))


if __name__ == "__main__":
    main()
