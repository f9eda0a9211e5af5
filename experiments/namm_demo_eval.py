"""Passkey prompts through one attention kind: exact match, answer probability and cache use.

    python experiments/namm_demo_eval.py eval MODEL KIND OPTIONS_JSON OUT.json --lengths 128,192 --depths 0,0.5 \
        [--trials 8] [--seed 0] [--filler-offset 0] [--every 32]
    python experiments/namm_demo_eval.py match KV_MEAN --lengths 128,192 [--every 32] [--answer 5]

For every prompt (lengths x depths x trials, keys of --seed, filler cycle starting at sentence
--filler-offset, key written one digit per token):
  * exact match: greedy generation (`longcpt.model.generation.generate`), first integer = key;
  * teacher forcing: the prompt and its answer read in calls of --every tokens (aligned with the
    evictions): the answer's geometric-mean token probability and the share of its digits that
    are the argmax;
  * cache use of an evicting kind, from the layer caches after each call of the teacher-forced
    pass (each call ends at an update): slots held per layer (the longest KV head, the rectangle a
    row needs) at the end / tokens read (`end`), the mean over the tokens read of the slots each
    token saw / the same mean for the full cache (`mean`), and the largest slot count / tokens
    read (`peak`); mean over layers. `full` is 1.0 for all three.
Writes OUT.json with the per-prompt rows and their means.

`match` prints the `cache_size` at which H2O and StreamingLLM (which hold min(cache_size, what
they have) after every update) hold the cache share KV_MEAN through prompts of those lengths plus
the answer, i.e. the size that compares them with a NAMM at the same memory through the prompt.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import longcpt
from longcpt.data import load_tokenizer
from longcpt.data.passkey import PasskeyPromptBuilder, passkey_key
from longcpt.eval.passkey import first_integer
from longcpt.fsio import atomic_write_json
from longcpt.model.generation import forward_chunks, generate


def cache_use(slots: list[list[int]], starts: list[int], total: int) -> dict[str, float]:
    """End/mean/peak shares from each layer's slot count at the start of every call (after the
    previous call's eviction); call i covers tokens starts[i] .. starts[i+1]-1."""
    ends = starts[1:] + [total]
    out = {"end": 0.0, "mean": 0.0, "peak": 0.0}
    full_sum = total * (total + 1) / 2
    for layer in slots:  # layer[i]: slots when call i began; layer[-1]: at the end
        seen_sum = peak = 0
        for s0, a, b in zip(layer, starts, ends):
            t = b - a
            seen_sum += t * s0 + t * (t + 1) / 2  # the slots grow by one per token read
            peak = max(peak, s0 + t)
        out["end"] += layer[-1] / total / len(slots)
        out["mean"] += seen_sum / full_sum / len(slots)
        out["peak"] += peak / total / len(slots)
    return out


def row_slots(cache) -> int | None:
    valid = getattr(cache, "valid", None)
    return None if valid is None else int(valid.sum(-1).amax(-1).max())


@torch.inference_mode()
def evaluate(model, builder, example, every: int, eos) -> dict:
    ids = torch.tensor([example.input_ids + example.answer_ids])
    state: dict = {}
    hidden, slots, starts = [], [], []
    for offset, h in forward_chunks(model, ids[:, :-1], state, every):
        slots = slots or [[0] for _ in state]  # no slot before the first call
        for layer, cache in zip(slots, state.values()):
            layer.append(row_slots(cache))  # after this call's eviction: the next call starts here
        starts.append(offset)
        hidden.append(h)
    total = ids.shape[1] - 1
    n = len(example.answer_ids)
    logits = model.lm_head(torch.cat(hidden, 1)[0, -n:]).float()
    logp = torch.log_softmax(logits, -1)
    target = ids[0, -n:]
    row = {"length": example.length, "depth": example.depth, "key": example.key,
           "answer_probability": math.exp(float(logp.gather(-1, target[:, None]).mean())),
           "digits_right": float((logp.argmax(-1) == target).float().mean())}
    if all(row_slots(c) is not None for c in state.values()):
        row.update({f"kv_{k}": v for k, v in cache_use(slots, starts, total).items()})
    else:
        row.update(kv_end=1.0, kv_mean=1.0, kv_peak=1.0)
    out = generate(model, torch.tensor([example.input_ids]), n + 3, eos_id=eos)
    row["correct"] = first_integer(builder.tokenizer.decode(out[0].tolist(), skip_special_tokens=True)) == example.key
    return row


def mean_share(cache_size: int, total: int, every: int) -> float:
    """The share a fixed-size eviction holds through `total` tokens: slots after each token, capped
    at cache_size after every update, summed, over the full cache's sum."""
    slots = held = 0
    for i in range(total):
        slots += 1
        held += slots
        if (i + 1) % every == 0:
            slots = min(slots, cache_size)
    return held / (total * (total + 1) / 2)


def match(target: float, lengths: list[int], every: int, answer: int) -> int:
    """The smallest cache_size whose mean share over `lengths` (+ answer - 1 tokens read) reaches `target`."""
    for size in range(1, max(lengths) + answer):
        if sum(mean_share(size, n + answer - 1, every) for n in lengths) / len(lengths) >= target:
            return size
    return max(lengths) + answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("match")
    fit.add_argument("kv_mean", type=float)
    fit.add_argument("--lengths", required=True)
    fit.add_argument("--every", type=int, default=32)
    fit.add_argument("--answer", type=int, default=5, help="answer tokens (read by teacher forcing)")
    ev = sub.add_parser("eval")
    ev.add_argument("model")
    ev.add_argument("kind")
    ev.add_argument("options")
    ev.add_argument("out")
    ev.add_argument("--lengths", required=True)
    ev.add_argument("--depths", required=True)
    ev.add_argument("--trials", type=int, default=8)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--filler-offset", type=int, default=0)
    ev.add_argument("--every", type=int, default=32, help="tokens per call: the eviction interval")
    args = parser.parse_args()
    if args.command == "match":
        print(match(args.kv_mean, [int(x) for x in args.lengths.split(",")], args.every, args.answer))
        return
    torch.set_num_threads(1)
    options = json.loads(args.options)
    model = longcpt.from_pretrained(args.model, attention=args.kind, **options).eval()
    tokenizer = load_tokenizer(args.model)
    builder = PasskeyPromptBuilder(tokenizer, split_digits=True, filler_offset=args.filler_offset)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for depth in [float(x) for x in args.depths.split(",")]:
            for trial in range(args.trials):
                ex = builder.build(length, depth, passkey_key(args.seed, length, depth, trial))
                rows.append(evaluate(model, builder, ex, args.every, tokenizer.eos_token_id))
    keys = ("correct", "answer_probability", "digits_right", "kv_end", "kv_mean", "kv_peak")
    report = {"attention": args.kind, "options": options, "lengths": args.lengths, "depths": args.depths,
              "trials": args.trials, "seed": args.seed, "filler_offset": args.filler_offset, "prompts": len(rows),
              **{k: sum(float(r[k]) for r in rows) / len(rows) for k in keys}, "rows": rows}
    atomic_write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


if __name__ == "__main__":
    main()
