"""Attention alone, fwd+bwd, on packed windows: longcpt's full / intra_doc / anchor vs transformers.

Rows, for each (tokens, documents) setting:
  * transformers full causal   transformers' `sdpa_attention_forward` + `apply_rotary_pos_emb`
                               (what LlamaForCausalLM runs with attn_implementation="sdpa");
  * transformers 4-D doc mask  the same with a dense (B, 1, T, T) boolean document mask, as users
                               usually isolate packed documents;
  * ours full / intra_doc / anchor   the registered attention cores (rotation included), each call
                               with a fresh per-forward cache, so the document grouping is paid too.
Shapes follow the train-step model: 8 query heads, 4 KV heads, head dim 32 (256 wide).
Document lengths are random (seeded) around T / documents; `--equal` makes them equal.

Target (issue 4) at 16K tokens / 32 documents: anchor at least 8x faster than full causal (the
ideal is T^2 / sum(len^2), printed as "ideal").

Run: python benchmarks/attention.py [--settings 4096:16,16384:32] [--reps 3] [--threads N]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import document_lengths, size_label, timed_rows  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from longcpt.model.attention import KINDS, AttentionContext  # noqa: E402
from longcpt.model.config import ModelArgs  # noqa: E402
from longcpt.model.rope import RotaryEmbedding  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 32




def packed_inputs(lens: list[int]):
    """cu_seqlens and the positions of docs/reference.md section 3 of one packed row."""
    t = sum(lens)
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    cu = torch.tensor(starts + [t], dtype=torch.int32)
    anchor = torch.arange(t)
    anchor[starts] = 0
    intra = torch.cat([torch.arange(n) for n in lens])
    return cu, {"full": torch.arange(t), "anchor": anchor, "intra_doc": intra}


def dense_document_mask(lens: list[int]) -> torch.Tensor:
    """(1, 1, T, T) boolean `causal & same document` mask, as users build it for transformers."""
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    t = len(doc)
    return ((doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril())[None, None]


class _HFModule(torch.nn.Module):
    """The attributes transformers' attention functions read from the attention module."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True
    training = True






def run_setting(tokens: int, docs: int, args) -> dict:
    lens = document_lengths(tokens, docs, args.seed, args.equal)
    cu, positions = packed_inputs(lens)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g, requires_grad=True)
    v = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g, requires_grad=True)
    rope = RotaryEmbedding(HEAD_DIM, 10000.0)
    model_args = ModelArgs(
        vocab_size=1, hidden_size=HEADS * HEAD_DIM, intermediate_size=1, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
    )
    hf_module = _HFModule()

    def ours(kind: str):
        core = KINDS[kind].cls(model_args, 0)
        pos = positions[kind][None]
        cos, sin = rope(pos)

        def step():
            ctx = AttentionContext(pos, None if kind == "full" else cu, cos, sin, rope)
            core(q, k, v, ctx).sum().backward()

        return step

    def transformers(mask: torch.Tensor | None, pos: torch.Tensor):
        cos, sin = rope(pos[None])  # fp32 here; transformers casts to q's dtype (fp32 too)

        def step():
            qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
            out, _ = sdpa_attention_forward(hf_module, qr, kr, v, mask, scaling=HEAD_DIM**-0.5)
            out.sum().backward()

        return step

    rows = {
        "transformers full causal": transformers(None, positions["full"]),
        "transformers 4-D doc mask": transformers(dense_document_mask(lens), positions["intra_doc"]),
        "ours full": ours("full"),
        "ours intra_doc": ours("intra_doc"),
        "ours anchor": ours("anchor"),
    }
    seconds = timed_rows(rows, args.reps)
    ideal = tokens * tokens / sum(n * n for n in lens)
    return {"tokens": tokens, "documents": docs, "ideal_speedup": ideal, "seconds": seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="4096:16,16384:32", help="tokens:documents,...")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--equal", action="store_true", help="equal document lengths")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]

    results = [run_setting(t, d, args) for t, d in settings]
    names = list(results[0]["seconds"])
    header = "| attention fwd+bwd | " + " | ".join(f"{size_label(r['tokens'])} / {r['documents']} docs" for r in results)
    print(header + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        cells = []
        for r in results:
            s = r["seconds"][name]
            cells.append(f"{s:.3f} s ({r['seconds']['transformers full causal'] / s:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| ideal anchor speed-up T^2/sum(len^2) | " + " | ".join(f"{r['ideal_speedup']:.1f}x" for r in results) + " |")
    print("(x = speed-up over transformers full causal)")
    last = results[-1]
    speedup = last["seconds"]["ours full"] / last["seconds"]["ours anchor"]
    print(
        f"anchor vs full causal at {size_label(last['tokens'])} / {last['documents']} docs: {speedup:.1f}x "
        f"(target >= 8x: {'met' if speedup >= 8 else 'NOT met'})"
    )
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    print(json.dumps({"benchmark": "attention", "results": results, "anchor_vs_full": speedup, "env": env},
                     default=lambda x: round(x, 4)))
    return results


if __name__ == "__main__":
    main()
