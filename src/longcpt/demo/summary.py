"""The demo's closing summary and figures, from what the run measured (nothing here is a constant).

    loss.png     training and validation loss of pretraining, then of the context extension
    ppl.png      perplexity by position before and after context extension, same documents
    passkey/passkey.png   written by `longcpt eval passkey`
    summary.txt  the text printed at the end: what was trained, the numbers, every artifact, the
                 stage times and the commands to go further
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from longcpt.fsio import atomic_write_text

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """`values` as a line of block characters, low = ▁, high = █, resampled to at most `width`.

    Example: sparkline([3, 2, 1]) == "█▅▁".
    """
    values = list(values)
    if not values:
        return ""
    if len(values) > width:  # mean of equal slices
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(BLOCKS[round((v - lo) / span * (len(BLOCKS) - 1))] for v in values)


def _points(metrics: dict, key: str, offset: int = 0) -> list[tuple[int, float]]:
    """(optimizer steps done, value): Lightning logs step s while taking step s + 1."""
    return [(step + 1 + offset, value) for step, value in sorted(metrics.get(key, {}).items())]


def _length(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def _parameters(hf_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def _prompts(demo, stage: str) -> str:
    """"1,800 prompts of 96-128 tokens": the prompt set a passkey stage trains on."""
    lengths, n = demo.passkey_set(stage)
    return f"{len(lengths) * n:,} prompts of {min(lengths):,}-{max(lengths):,} tokens"


def loss_table(train: list[tuple[int, float]], val: list[tuple[int, float]], rows: int = 8) -> list[str]:
    """A few rows of step / training loss / validation loss (the validation steps, else evenly spaced)."""
    val_at = dict(val)
    train_at = dict(train)
    steps = [s for s, _ in val] or [s for s, _ in train]
    if len(steps) > rows:
        steps = [steps[round(i * (len(steps) - 1) / (rows - 1))] for i in range(rows)]
    lines = [f"    {'step':>6}  {'train':>7}  {'val':>7}"]
    for s in steps:
        t = train_at.get(s)
        v = val_at.get(s)
        lines.append(f"    {s:>6}  {t if t is None else format(t, '7.3f'):>7}  {v if v is None else format(v, '7.3f'):>7}")
    return lines


def write_summary(demo, runner) -> Path:
    """Draw loss.png and ppl.png, print the closing summary and save it as summary.txt."""
    from longcpt.eval.figures import loss_plot, ppl_plot
    from longcpt.lit.logs import read_metrics

    out = demo.out
    results = {t.name: json.loads(runner.marker(t.name).read_text())["result"] for t in runner.times}
    pre, ext = results["pretrain"], results["extend"]
    m_pre, m_ext = read_metrics(demo.run_dir("pretrain")), read_metrics(demo.run_dir("extend"))
    passkey_stages = demo.passkey_stages
    old, new = pre["seq_len"], ext["seq_len"]
    vocab = results["tokenizer"]["vocab_size"]
    params = _parameters(Path(pre["hf"]))
    shape = json.loads((Path(pre["hf"]) / "config.json").read_text())

    # -- figures -------------------------------------------------------------------------------
    train_pre, val_pre = _points(m_pre, "train/loss"), _points(m_pre, "val/loss")
    train_ext, val_ext = _points(m_ext, "train/loss", pre["steps"]), _points(m_ext, "val/loss", pre["steps"])
    loss_png = loss_plot(
        [(f"pretraining, {_length(old)} windows", train_pre, val_pre),
         (f"extension, {_length(new)} windows", train_ext, val_ext)],
        f"tiny Llama ({params / 1e6:.1f}M parameters), AnchorAttention: pretraining, then context extension",
        out / "loss.png",
        marks={f"context extension: {_length(new)}, rope_theta {ext['rope_theta']:,.0f}": pre["steps"]},
    )
    before = json.loads((demo.ppl_before / "ppl.json").read_text())
    after = json.loads((demo.ppl_after / "ppl.json").read_text())
    ppl_png = ppl_plot(
        {f"before: trained at {_length(old)}, rope_theta {pre['rope_theta']:,.0f}": before["buckets"],
         f"after: + {ext['steps']} steps at {_length(new)}, rope_theta {ext['rope_theta']:,.0f}": after["buckets"]},
        f"perplexity by position: {before['n_docs']} held-out documents of {_length(new)} tokens",
        out / "ppl.png",
        marks={f"pretraining length {_length(old)}": old},
    )
    passkey = json.loads((demo.passkey / "passkey.json").read_text())

    # -- text ----------------------------------------------------------------------------------
    def tokens(m: dict) -> int:
        values = m.get("train/tokens", {})
        return int(values[max(values)]) if values else 0

    splits = results["prepare"]["splits"]
    corpus = results["corpus"]
    lines = ["WHAT WAS TRAINED",
             f"  A Llama of {params / 1e6:.2f}M parameters ({shape['num_hidden_layers']} layers x "
             f"{shape['hidden_size']}, {shape['num_attention_heads']} heads) from scratch, "
             f"AnchorAttention, on {corpus['documents']:,} documents ({corpus['bytes'] / 1e6:.1f} MB) of Python's "
             f"standard library, BPE vocabulary {vocab:,}; {splits['val']['documents']:,} documents "
             f"({splits['val']['tokens']:,} tokens) held out.",
             f"  1. pretraining: {pre['steps']} steps of {pre['micro_batch_size']} x {old:,} tokens "
             f"({tokens(m_pre):,} tokens), rope_theta {pre['rope_theta']:,.0f}",
             f"  2. context extension: {ext['steps']} steps of {ext['micro_batch_size']} x {new:,} tokens "
             f"({tokens(m_ext):,} tokens), rope_theta raised to {ext['rope_theta']:,.0f}",
             "  3. passkey fine-tuning (prompts packed several to a row where rows are long):",
             *[f"     {stage:<9} {results[stage]['steps']:>4} steps of {results[stage]['micro_batch_size']} x "
               f"{results[stage]['seq_len']:,} tokens, {_prompts(demo, stage)}, "
               f"loss on {demo.loss_on(stage)}" for stage in passkey_stages],
             "", "LOSS (nats per token; a uniform guess over the vocabulary is "
             f"ln {vocab:,} = {math.log(vocab):.2f})"]
    for label, train, val in (("pretraining", train_pre, val_pre), ("context extension", train_ext, val_ext)):
        if train:
            lines.append(f"  {label:<18} training   {train[0][1]:.2f} (step {train[0][0]}) "
                         f"{sparkline([v for _, v in train])} {train[-1][1]:.2f} (step {train[-1][0]})")
        if val:
            lines.append(f"  {'':<18} validation {val[0][1]:.2f} (step {val[0][0]}) "
                         f"{sparkline([v for _, v in val])} {val[-1][1]:.2f} (step {val[-1][0]})")
    lines += loss_table(train_pre + train_ext, val_pre + val_ext)
    for stage in passkey_stages:
        train = _points(read_metrics(demo.run_dir(stage)), "train/loss")
        if train:
            lines.append(f"  {'passkey ' + stage:<18} training   {train[0][1]:.2f} (step {train[0][0]}) "
                         f"{sparkline([v for _, v in train])} {train[-1][1]:.2f} (step {train[-1][0]})")

    lines += ["", f"PERPLEXITY BY POSITION ({before['n_docs']} held-out documents of {new:,} tokens; "
              f"pretrained at {old:,})", f"    {'positions':>13}  {'before':>8}  {'after':>8}"]
    for b, a in zip(before["buckets"], after["buckets"]):
        lines.append(f"    {b['start']:>6}-{b['end']:<6}  {b['ppl']:>8.1f}  {a['ppl']:>8.1f}")
    at_old = _bucket_ending(before["buckets"], old), _bucket_ending(after["buckets"], old)
    at_new = before["buckets"][-1], after["buckets"][-1]
    lines.append(f"  at the old length (positions {at_old[0]['start']:,}-{old:,}): {at_old[0]['ppl']:.1f} before, "
                 f"{at_old[1]['ppl']:.1f} after; at the new length (positions {at_new[0]['start']:,}-{new:,}): "
                 f"{at_new[0]['ppl']:.1f} before, {at_new[1]['ppl']:.1f} after")

    longest = max(max(lengths) for lengths, _ in demo.plan.passkey_sets.values())
    lines += ["", f"PASSKEY (exact match of the 5-digit key; {len(passkey['depths'])} depths x {passkey['trials']} "
              f"trials per length; fine-tuned on prompts of <= {longest:,} tokens, window {new:,})"]
    lines.append("  " + "  ".join(f"{_length(int(n))}: {acc:.0%}" for n, acc in passkey["by_length"].items()))

    runs = {stage: demo.run_dir(stage) for stage in demo.training_stages}
    lines += ["", "ARTIFACTS",
              f"  loss curve            {loss_png}",
              f"  perplexity plot       {ppl_png}   (data: {demo.ppl_before / 'ppl.json'}, {demo.ppl_after / 'ppl.json'})",
              f"  passkey heatmap       {demo.passkey / 'passkey.png'}   (data: {demo.passkey / 'passkey.json'})",
              f"  corpus, tokenizer     {demo.corpus}, {demo.tokenizer}",
              f"  prepared data         {demo.data} (train, val)",
              f"  passkey prompts       {demo.passkey_dir}"]
    for stage, run in runs.items():
        lines.append(f"  {stage + ' run':<21} {run}  (Hugging Face export: {run / 'hf'}; logs/csv, checkpoints/)")
    lines += [f"  stage markers         {out / 'stages'}  (delete one to redo that stage)", "",
              "STAGE TIMES (wall, and CPU time of all threads)"]
    total_wall = total_cpu = 0.0
    for t in runner.times:
        total_wall, total_cpu = total_wall + t.seconds, total_cpu + t.cpu_seconds
        note = "  (earlier run)" if t.reused else ""
        lines.append(f"  {t.seconds:7.0f} s  {t.cpu_seconds:7.0f} s  {t.name:<13}{note}")
    lines.append(f"  {total_wall:7.0f} s  {total_cpu:7.0f} s  all stages ({total_wall / 60:.1f} min)")

    lines += ["", "GO FURTHER",
              "  # the full passkey demonstration (longer prompts, Infini-attention; about an hour on 2 cores)",
              f"  experiments/passkey_demo.sh {runs['pretrain'] / 'hf'} {out / 'passkey_full'}",
              "  # a GPU recipe: Llama-3-8B to 128K with AnchorAttention, two nodes of 8 GPUs under SLURM",
              "  sbatch --nodes=2 slurm/train.sbatch recipes/anchor_llama3_8b_128k.yaml \\",
              "      model.pretrained=/models/Meta-Llama-3-8B data.train=DATA/train data.val=DATA/val",
              "  # what that recipe needs per GPU, and its step time, before you rent the GPUs (only the",
              "  # model's config.json is read: the copy in tests/fixtures will do)",
              "  longcpt plan recipes/anchor_llama3_8b_128k.yaml \\",
              "      model.pretrained=tests/fixtures/model_configs/Meta-Llama-3-8B --gpu-memory 80GiB"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    return atomic_write_text(out / "summary.txt", text)


def _bucket_ending(buckets: list[dict], position: int) -> dict:
    """The bucket holding the last position before `position` (the end of the trained window)."""
    return next((b for b in buckets if b["start"] < position <= b["end"]), buckets[-1])
