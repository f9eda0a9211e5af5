"""One training step (loss fwd+bwd), longcpt eager and compiled vs transformers' LlamaForCausalLM.

Models (same weights in both libraries, fp32, SDPA attention):
  * bench   4 layers, 256 wide, 8 heads, 4 KV heads, vocab 8192;
  * demo    `make demo`'s model (recipes/tiny_cpu.yaml): 4 layers, 128 wide, 4 heads, 2 KV heads,
            vocab 2048 (1.3M parameters).
Rows, for each model and (batch x tokens, documents) setting:
  * transformers full causal     `LlamaForCausalLM(input_ids, labels=...)`;
  * transformers 4-D doc mask    the same with a dense (B, 1, T, T) boolean document mask and
                                 positions restarting per document, as users usually pack;
  * ours full                    `CausalLM.loss` (chunked cross-entropy), attention="full";
  * ours intra_doc / anchor      the same on the packed window (cu_seqlens + the kind's positions);
  * ours s2                      LongLoRA's shifted sparse attention on the packed window, groups of a
                                 quarter of the window (`--s2-group`), half of the heads shifted;
  * ours full / anchor [blocks]  the same with `trainer.compile: blocks` (`longcpt.model.compile`:
                                 each decoder block compiled by inductor, C++/OpenMP on CPU).
Each cell: seconds per step (best of the interleaved runs) and the speed-up over transformers'
full-causal step, tokens per second, and the step's peak memory above the resident size before it
(Linux VmHWM, freed buffers returned to the system; "-" elsewhere). The first step of every row is
reported apart: for the compiled rows it includes compiling (cold: a fresh inductor cache folder
unless --inductor-cache is given; the second setting recompiles for its new length).

Targets: ours full at least as fast as transformers (issue 2); at 16K tokens / 32 documents the
anchor step at least 2.5x faster than transformers' full-causal step (issue 4).

Run: python benchmarks/train_step.py [--models bench,demo] [--settings 4096:16,16384:32]
         [--compile blocks|none] [--reps 2] [--threads N] [--skip ROW ...] [--inductor-cache DIR]
Settings are tokens:documents (one row) or BxT:documents (B rows of T tokens, documents per row).
Prints a table per model and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import document_lengths, peak_above_start, return_freed_memory, size_label  # noqa: E402

from longcpt.model.compile import compile_model, compile_report, mark_dynamic, use_cache_dir  # noqa: E402
from longcpt.model.config import ModelArgs  # noqa: E402
from longcpt.model.hf_io import build_model  # noqa: E402

MODELS = {
    "bench": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    "demo": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
MIB = 2**20
POSITIONS = {"s2": "intra_doc"}  # the position ids a kind reads from `packed_batch` (s2: per document)


def parse_setting(text: str) -> tuple[int, int, int]:
    """'16384:32' -> (1, 16384, 32); '8x512:4' -> (8, 512, 4)."""
    shape, docs = text.split(":")
    batch, tokens = shape.split("x") if "x" in shape else ("1", shape)
    return int(batch), int(tokens), int(docs)


def packed_batch(rows: list[list[int]], vocab: int, bos: int = 1) -> dict[str, torch.Tensor]:
    """Packed rows as `longcpt.batch` defines them (tokens random, each document opens with BOS)."""
    b, t = len(rows), sum(rows[0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    anchor, intra, masks, flat_starts = [], [], [], []
    for r, lens in enumerate(rows):
        starts = torch.tensor([0] + lens[:-1]).cumsum(0)
        ids[r, starts] = bos
        labels[r, starts[1:] - 1] = -100  # the last token of a document predicts nothing
        pos = torch.arange(t)
        pos[starts] = 0
        anchor.append(pos)
        intra.append(torch.cat([torch.arange(n) for n in lens]))
        doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        masks.append((doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril())
        flat_starts += (starts + r * t).tolist()
    return {
        "input_ids": ids,
        "labels": labels,  # aligned: labels[t] is the target of token t
        "cu_seqlens": torch.tensor(flat_starts + [b * t], dtype=torch.int32),
        "anchor": torch.stack(anchor),
        "intra_doc": torch.stack(intra),
        "mask": torch.stack(masks)[:, None],
    }


def hf_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers shifts labels itself: labels_hf[t+1] = target of t."""
    out = torch.full_like(labels, -100)
    out[:, 1:] = labels[:, :-1]
    return out


def build(name: str, tokens: int, compiled: bool, s2_group: int | None = None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**MODELS[name], max_position_embeddings=tokens, rope_theta=10000.0,
                                   bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(cfg).train()
    state = hf.state_dict()
    ours = {kind: build_model(_args(cfg, kind), state).train() for kind in ("full", "intra_doc", "anchor")}
    ours["s2"] = build_model(_args(cfg, "s2", {"group_size": s2_group or max(2, tokens // 4)}), state).train()
    if compiled:
        for kind in ("full", "anchor"):
            ours[f"{kind} [blocks]"] = build_model(_args(cfg, kind), state).train()
            compile_model(ours[f"{kind} [blocks]"], "blocks")
    return hf, ours


def _args(cfg: transformers.LlamaConfig, kind: str, options: dict | None = None) -> ModelArgs:
    args = ModelArgs.from_hf_config(cfg.to_dict())
    args.attention = kind
    args.attention_options = dict(options or {})
    return args


def measure(rows: dict, reps: int) -> dict[str, dict]:
    """Per row: the first step's seconds, then the best of `reps` interleaved steps and the peak
    memory of the last one."""
    out = {}
    for name, fn in rows.items():
        t0 = time.perf_counter()
        fn()
        out[name] = {"first_s": time.perf_counter() - t0, "s": float("inf")}
    for rep in range(reps):
        for name, fn in rows.items():
            if rep == reps - 1:
                t0 = time.perf_counter()
                out[name]["peak_bytes"] = peak_above_start(fn)
                elapsed = time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
            out[name]["s"] = min(out[name]["s"], elapsed)
    return out


def run_setting(model: str, setting: tuple[int, int, int], args) -> dict:
    b, t, docs = setting
    compiled = args.compile == "blocks"
    hf, ours = build(model, t, compiled, args.s2_group)
    rows = [document_lengths(t, docs, args.seed + r, args.equal) for r in range(b)]
    batch = packed_batch(rows, MODELS[model]["vocab_size"])
    ids, labels, cu = batch["input_ids"], batch["labels"], batch["cu_seqlens"]
    full_labels = torch.roll(ids, -1, 1)
    full_labels[:, -1] = -100

    def step(m, loss_fn):
        def run():
            m.zero_grad(set_to_none=True)
            loss_fn().backward()

        return run

    def ours_step(name: str, kind: str):
        m = ours[name]
        if kind == "full":
            return step(m, lambda: m.loss(ids, full_labels))

        def loss():
            mark_dynamic(cu)
            return m.loss(ids, labels, position_ids=batch[POSITIONS.get(kind, kind)], cu_seqlens=cu)

        return step(m, loss)

    table = {
        "transformers full causal": step(hf, lambda: hf(input_ids=ids, labels=hf_labels(full_labels)).loss),
        "transformers 4-D doc mask": step(hf, lambda: hf(
            input_ids=ids, attention_mask=batch["mask"], position_ids=batch["intra_doc"], labels=hf_labels(labels)
        ).loss),
        "ours full": ours_step("full", "full"),
        "ours intra_doc": ours_step("intra_doc", "intra_doc"),
        "ours anchor": ours_step("anchor", "anchor"),
        "ours s2": ours_step("s2", "s2"),
    }
    if compiled:
        table["ours full [blocks]"] = ours_step("full [blocks]", "full")
        table["ours anchor [blocks]"] = ours_step("anchor [blocks]", "anchor")
    skip = set(args.skip)
    results = measure({n: fn for n, fn in table.items() if n not in skip}, args.reps)

    # Same model, same loss: a check that the comparison is fair (not a timing).
    with torch.no_grad():
        loss_hf = hf(input_ids=ids, labels=hf_labels(full_labels)).loss.item()
        loss_ours = ours["full"].loss(ids, full_labels).item()
    return {"model": model, "batch": b, "tokens": t, "documents": docs, "rows": results,
            "loss_diff_full": abs(loss_hf - loss_ours)}


def setting_label(r: dict) -> str:
    shape = size_label(r["tokens"]) if r["batch"] == 1 else f"{r['batch']} x {r['tokens']}"
    return f"{shape} / {r['documents']} docs" + (" per row" if r["batch"] > 1 else "")


def print_table(results: list[dict]) -> None:
    model = results[0]["model"]
    print(f"| train step fwd+bwd, {model} model | " + " | ".join(setting_label(r) for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    names = list(dict.fromkeys(n for r in results for n in r["rows"]))
    for name in names:
        cells = []
        for r in results:
            row = r["rows"].get(name)
            if row is None:
                cells.append("-")
                continue
            base = r["rows"].get("transformers full causal")
            tok_s = r["batch"] * r["tokens"] / row["s"]
            peak = f"{row['peak_bytes'] / MIB:.0f} MiB" if row.get("peak_bytes") else "-"
            speed = f" ({base['s'] / row['s']:.2f}x)" if base else ""
            cells.append(f"{row['s']:.2f} s{speed}, {tok_s / 1000:.1f}K tok/s, {peak}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| first step (compiles the [blocks] rows) | " + " | ".join(
        ", ".join(f"{n.removeprefix('ours ')} {row['first_s']:.1f} s" for n, row in r["rows"].items()
                  if "[blocks]" in n or n == "ours anchor") or "-"
        for r in results) + " |")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bench,demo", help="bench,demo")
    p.add_argument("--settings", default="4096:16,16384:32", help="tokens:documents or BxT:documents, ...")
    p.add_argument("--compile", default="blocks", choices=["blocks", "none"], help="add the compiled rows")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--equal", action="store_true", help="equal document lengths")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    p.add_argument("--s2-group", type=int, default=None, help="s2's group_size (default: a quarter of the window)")
    p.add_argument("--inductor-cache", default=None, help="inductor's cache folder (default: a fresh one, cold)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return_freed_memory()
    cache = use_cache_dir(Path(args.inductor_cache or tempfile.mkdtemp(prefix="inductor-")))
    settings = [parse_setting(s) for s in args.settings.split(",")]

    results, verdict = [], {}
    for model in args.models.split(","):
        per_model = [run_setting(model, s, args) for s in settings]
        print_table(per_model)
        results += per_model
        for r in per_model:
            rows = r["rows"]
            if "transformers full causal" in rows and "ours full" in rows:
                ratio = rows["transformers full causal"]["s"] / rows["ours full"]["s"]
                verdict[f"{model}_full_{r['tokens']}"] = ratio
                print(f"{model} {setting_label(r)}: ours full vs transformers {ratio:.2f}x (target >= 1: "
                      f"{'met' if ratio >= 1 else 'NOT met'}); loss difference {r['loss_diff_full']:.2e}")
            for peer in ("full", "anchor"):  # LongLoRA's training attention against the window's
                if "ours s2" in rows and f"ours {peer}" in rows:
                    speedup = rows[f"ours {peer}"]["s"] / rows["ours s2"]["s"]
                    verdict[f"{model}_s2_vs_{peer}_{r['batch']}x{r['tokens']}_{r['documents']}docs"] = speedup
                    print(f"{model} {setting_label(r)}: s2 step {speedup:.2f}x faster than {peer}")
            for kind in ("full", "anchor"):
                if f"ours {kind}" in rows and f"ours {kind} [blocks]" in rows:
                    gain = rows[f"ours {kind}"]["s"] / rows[f"ours {kind} [blocks]"]["s"]
                    verdict[f"{model}_{kind}_blocks_speedup_{r['batch']}x{r['tokens']}"] = gain
        last = per_model[-1]["rows"]
        if model == "bench" and "transformers full causal" in last and "ours anchor" in last:
            ratio = last["transformers full causal"]["s"] / last["ours anchor"]["s"]
            verdict["anchor_vs_transformers_full"] = ratio
            print(f"anchor step vs transformers full-causal step at {setting_label(per_model[-1])}: {ratio:.2f}x "
                  f"(target >= 2.5x: {'met' if ratio >= 2.5 else 'NOT met'})")
        print()
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "inductor_cache": str(cache),
           "compile": compile_report().summary() if args.compile == "blocks" else None}
    print(json.dumps({"benchmark": "train_step", "results": results, **verdict, "env": env},
                     default=lambda x: round(x, 4)))
    return results


if __name__ == "__main__":
    main()
