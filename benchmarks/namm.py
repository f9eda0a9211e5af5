"""NAMM and the reference evictions: policy overhead, prefill time and KV memory (issue 14).

For each prompt length L, one prompt is read through the model in chunks (`forward_chunks`, the
path every evaluation takes) with:
  * `full`: the KV cache keeps everything (SDPA);
  * `namm` with the BAM scorer and with the MLP scorer: evictions every 512 tokens;
  * `h2o` and `streaming` with `cache_size` set so that they keep the same share of the cache as
    NAMM-BAM at the end of the prompt (L is a multiple of 512, so an update ends every prompt).
It reports, side by side in one run: prefill seconds (and the ratio to `full`), the KV cache
held at the end (MiB, keys + values of every layer, padding slots included) and `kv_kept`; and
for NAMM the policy's own time (features + scorer, measured around its `select`) per 512-token
update, as a share of the rest of the prefill (target: <= 15% at 16K).

Model: a small Llama (4 layers, 256 wide, 8 heads / 4 KV heads, head dim 32, vocab 8192), random
weights. Policy: `--policy FILE` (e.g. a trained one: a NAMM reads only attention, so it applies to
any model), else a synthetic one that keeps a token while the DC part of its attention spectrogram
is above the median a keep-all pass sees (the cost does not depend on the weights, only on the
tokens kept). Run:

    python benchmarks/namm.py                      # 4K, 16K, 32K
    python benchmarks/namm.py --lengths 4096,16384 --quick-kinds
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import size_label  # noqa: E402

from longcpt.model import CausalLM, ModelArgs  # noqa: E402
from longcpt.model.attention import namm as namm_module  # noqa: E402
from longcpt.model.attention.namm import NammPolicy, NammSpec, load_policy  # noqa: E402
from longcpt.model.generation import forward_chunks, kv_kept  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=1 << 17)
MIB = 2**20


def build(kind: str, options: dict, weights: dict) -> CausalLM:
    model = CausalLM(ModelArgs(**MODEL, attention=kind, attention_options=options)).eval()
    model.load_state_dict(weights)
    return model


def kv_bytes(state: dict) -> int:
    total = 0
    for cache in state.values():
        length = getattr(cache, "length", None)
        k, v = cache.k, cache.v
        if type(cache).__name__ == "KVCache":  # a doubling buffer: count the filled part
            total += 2 * k[:, :, :length].numel() * k.element_size()
        else:
            total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


def prefill(model: CausalLM, ids: torch.Tensor, chunk: int) -> tuple[float, dict]:
    state: dict = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in forward_chunks(model, ids, state, chunk):
            pass
    return time.perf_counter() - t0, state


class PolicyTimer:
    """Accumulates the time spent in NAMM's `select` (features + scorer + keep mask)."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._select = namm_module.NammAttention.select

    def __enter__(self):
        timer = self

        def timed(core, cache):
            t0 = time.perf_counter()
            out = timer._select(core, cache)
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1
            return out

        namm_module.NammAttention.select = timed
        return self

    def __exit__(self, *exc):
        namm_module.NammAttention.select = self._select


def synthetic_policy(scorer: str, weights: dict, probe_len: int) -> NammPolicy:
    """Keep while the DC part of the attention spectrogram is above a keep-all pass's median."""
    policy = NammPolicy.zeros(NammSpec(scorer=scorer))
    policy.weights()["out.bias"].fill_(1.0)
    ids = torch.randint(0, MODEL["vocab_size"], (1, probe_len), generator=torch.Generator().manual_seed(1))
    _, state = prefill(build("namm", {"policy": policy}, weights), ids, 4096)
    policy.feature_mean[0] = torch.cat([c.extra["namm_ema"][..., 0].flatten() for c in state.values()]).median()
    policy.weights()["out.bias"].fill_(0.0)
    policy.weights()["out.weight"][policy.spec.recency_dim] = 1.0
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,16384,32768")
    parser.add_argument("--chunk", type=int, default=4096, help="prompt tokens per model call")
    parser.add_argument("--policy", default=None, help="a NAMM policy file (default: the synthetic one)")
    parser.add_argument("--quick-kinds", action="store_true", help="skip the MLP scorer")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    weights = CausalLM(ModelArgs(**MODEL, attention="full")).state_dict()
    scorers = ["bam"] if args.quick_kinds else ["bam", "mlp"]
    policies = {}
    for scorer in scorers:
        if args.policy:
            policies[scorer] = load_policy(args.policy)
            if policies[scorer].spec.scorer != scorer:
                continue
        else:
            policies[scorer] = synthetic_policy(scorer, weights, 2048)
    rows, results = [], {}
    for length in lengths:
        ids = torch.randint(0, MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
        runs = {}
        seconds, state = prefill(build("full", {}, weights), ids, args.chunk)
        runs["full"] = {"seconds": seconds, "kv_mib": kv_bytes(state) / MIB, "kv_kept": 1.0}
        for scorer, policy in policies.items():
            model = build("namm", {"policy": policy}, weights)
            with PolicyTimer() as timer:
                seconds, state = prefill(model, ids, args.chunk)
            updates = timer.calls // MODEL["num_hidden_layers"]
            runs[f"namm-{scorer}"] = {
                "seconds": seconds, "kv_mib": kv_bytes(state) / MIB, "kv_kept": kv_kept(state),
                "policy_seconds": timer.seconds, "policy_share": timer.seconds / (seconds - timer.seconds),
                "policy_ms_per_update": 1000 * timer.seconds / max(updates, 1),
            }
        share = runs[f"namm-{scorers[0]}"]["kv_kept"]
        cache_size = max(8, round(share * length))
        for kind, options in (("h2o", {"cache_size": cache_size}), ("streaming", {"cache_size": cache_size})):
            seconds, state = prefill(build(kind, options, weights), ids, args.chunk)
            runs[kind] = {"seconds": seconds, "kv_mib": kv_bytes(state) / MIB, "kv_kept": kv_kept(state)}
        for name, r in runs.items():
            r["vs_full"] = runs["full"]["seconds"] / r["seconds"]
            rows.append((size_label(length), name, r))
        results[str(length)] = runs
        print(f"{size_label(length)} done", file=sys.stderr, flush=True)

    print(f"\nprefill of one prompt, chunks of {args.chunk} tokens, evictions every 512 (CPU, "
          f"{torch.get_num_threads()} threads)")
    print(f"{'L':>5} {'kind':<12} {'seconds':>9} {'full/x':>7} {'KV MiB':>8} {'kv_kept':>8} {'policy ms/update':>17} "
          f"{'policy / rest':>14}")
    for label, name, r in rows:
        policy = (f"{r['policy_ms_per_update']:>17.1f} {100 * r['policy_share']:>13.1f}%" if "policy_share" in r
                  else f"{'':>17} {'':>14}")
        print(f"{label:>5} {name:<12} {r['seconds']:>9.2f} {r['vs_full']:>6.2f}x {r['kv_mib']:>8.2f} "
              f"{r['kv_kept']:>8.3f} {policy}")
    print(json.dumps({"benchmark": "namm", "model": MODEL, "chunk": args.chunk, "results": results}))


if __name__ == "__main__":
    main()
