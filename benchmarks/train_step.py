"""One training step (loss fwd+bwd), longcpt vs transformers' LlamaForCausalLM, same weights.

Model: 4 layers, 256 wide, 8 heads, 4 KV heads, vocab 8192 (fp32, SDPA attention), built by
transformers and loaded into longcpt. Rows, for each (tokens, documents) setting:
  * transformers full causal     `LlamaForCausalLM(input_ids, labels=...)`;
  * transformers 4-D doc mask    the same with a dense (1, 1, T, T) boolean document mask and
                                 positions restarting per document, as users usually pack;
  * ours full                    `CausalLM.loss` (chunked cross-entropy), attention="full";
  * ours intra_doc / anchor      the same on the packed window (cu_seqlens + the kind's positions);
  * ours s2                      LongLoRA's shifted sparse attention on the packed window, groups of a
                                 quarter of the window (the paper's setting), half of the heads shifted.
Speed-ups are against transformers' full-causal step at the same length; the s2 line compares it
with ours anchor and ours full in the same run.

Targets: ours full at least as fast as transformers (issue 2); at 16K tokens / 32 documents the
anchor step at least 2.5x faster than transformers' full-causal step (issue 4).

Run: python benchmarks/train_step.py [--settings 4096:16,16384:32] [--reps 2] [--threads N]
     python benchmarks/train_step.py --settings 16384:1,16384:32 --skip "transformers 4-D doc mask"  (s2 at 16K)
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import document_lengths, size_label, timed_rows  # noqa: E402

from longcpt.model.config import ModelArgs  # noqa: E402
from longcpt.model.hf_io import build_model  # noqa: E402


def packed_batch(lens: list[int], vocab: int, bos: int = 1) -> dict[str, torch.Tensor]:
    """One packed row as `longcpt.batch` defines it (tokens random, each document opens with BOS)."""
    t = sum(lens)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, t), generator=g)
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    ids[0, starts] = bos
    labels = torch.roll(ids, -1, 1)
    labels[0, starts[1:] - 1] = -100  # the last token of a document predicts nothing
    labels[0, -1] = -100
    anchor = torch.arange(t)
    anchor[starts] = 0
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    return {
        "input_ids": ids,
        "labels": labels,  # aligned: labels[t] is the target of token t
        "cu_seqlens": torch.tensor(starts.tolist() + [t], dtype=torch.int32),
        "anchor": anchor[None],
        "intra_doc": torch.cat([torch.arange(n) for n in lens])[None],
        "mask": mask[None, None],
    }


def hf_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers shifts labels itself: labels_hf[t+1] = target of t."""
    out = torch.full_like(labels, -100)
    out[:, 1:] = labels[:, :-1]
    return out






def build(tokens: int) -> tuple[transformers.LlamaForCausalLM, dict]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=tokens, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(cfg).train()
    state = hf.state_dict()
    ours = {}
    for kind in ("full", "intra_doc", "anchor", "s2"):
        args = ModelArgs.from_hf_config(cfg.to_dict())
        args.attention = kind
        if kind == "s2":
            args.attention_options = {"group_size": tokens // 4}
        ours[kind] = build_model(args, state).train()
    return hf, ours


def run_setting(tokens: int, docs: int, args) -> dict:
    hf, ours = build(tokens)
    batch = packed_batch(document_lengths(tokens, docs, args.seed, args.equal), 8192)
    ids, labels = batch["input_ids"], batch["labels"]
    full_labels = torch.roll(ids, -1, 1)
    full_labels[0, -1] = -100

    def step(model, loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss_fn().backward()

        return run

    rows = {
        "transformers full causal": step(hf, lambda: hf(input_ids=ids, labels=hf_labels(full_labels)).loss),
        "transformers 4-D doc mask": step(hf, lambda: hf(
            input_ids=ids, attention_mask=batch["mask"], position_ids=batch["intra_doc"], labels=hf_labels(labels)
        ).loss),
        "ours full": step(ours["full"], lambda: ours["full"].loss(ids, full_labels)),
    }
    for kind, positions in (("intra_doc", "intra_doc"), ("anchor", "anchor"), ("s2", "intra_doc")):
        model = ours[kind]
        rows[f"ours {kind}"] = step(model, lambda m=model, p=positions: m.loss(
            ids, labels, position_ids=batch[p], cu_seqlens=batch["cu_seqlens"]
        ))
    skip = set(args.skip)
    seconds = timed_rows({n: fn for n, fn in rows.items() if n not in skip}, args.reps)

    # Same model, same loss: a check that the comparison is fair (not a timing).
    with torch.no_grad():
        loss_hf = hf(input_ids=ids, labels=hf_labels(full_labels)).loss.item()
        loss_ours = ours["full"].loss(ids, full_labels).item()
    return {"tokens": tokens, "documents": docs, "seconds": seconds, "loss_diff_full": abs(loss_hf - loss_ours)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="4096:16,16384:32", help="tokens:documents,...")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--equal", action="store_true", help="equal document lengths")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]

    results = [run_setting(t, d, args) for t, d in settings]
    names = list(dict.fromkeys(n for r in results for n in r["seconds"]))
    print("| train step fwd+bwd | " + " | ".join(f"{size_label(r['tokens'])} / {r['documents']} docs" for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        cells = []
        for r in results:
            s = r["seconds"].get(name)
            base = r["seconds"].get("transformers full causal")
            cells.append("-" if s is None else f"{s:.2f} s" + (f" ({base / s:.2f}x)" if base else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("(x = speed-up over transformers' full-causal step at the same length)")
    verdict = {}
    for r in results:
        sec = r["seconds"]
        if "transformers full causal" in sec and "ours full" in sec:
            ratio = sec["transformers full causal"] / sec["ours full"]
            verdict[f"full_{r['tokens']}"] = ratio
            print(f"{size_label(r['tokens'])} ours full vs transformers: {ratio:.2f}x (target >= 1: "
                  f"{'met' if ratio >= 1 else 'NOT met'}); loss difference {r['loss_diff_full']:.2e}")
    last = results[-1]["seconds"]
    if "transformers full causal" in last and "ours anchor" in last:
        ratio = last["transformers full causal"] / last["ours anchor"]
        verdict["anchor_vs_transformers_full"] = ratio
        print(f"anchor step vs transformers full-causal step at {size_label(results[-1]['tokens'])} / "
              f"{results[-1]['documents']} docs: {ratio:.2f}x (target >= 2.5x: {'met' if ratio >= 2.5 else 'NOT met'})")
    for r in results:
        sec = r["seconds"]
        if "ours s2" in sec:
            for peer in ("ours anchor", "ours full"):
                if peer in sec:
                    ratio = sec[peer] / sec["ours s2"]
                    verdict[f"s2_vs_{peer.split()[1]}_{r['tokens']}_{r['documents']}"] = ratio
                    print(f"{size_label(r['tokens'])} / {r['documents']} docs: s2 step {ratio:.2f}x faster than {peer}")
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}
    print(json.dumps({"benchmark": "train_step", "results": results, **verdict, "env": env},
                     default=lambda x: round(x, 4)))
    return results


if __name__ == "__main__":
    main()
