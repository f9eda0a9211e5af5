"""`longcpt eval ppl`: perplexity by position on long held-out documents.

    longcpt eval ppl --model DIR --data PREPARED --seq-len 16384 --output OUT [--bucket 2048]

Takes the first `--max-docs` documents that have at least `seq_len` tokens (with BOS), reads
the first `seq_len` tokens of each through the model in chunks of `--chunk` tokens with the
model's state (KV cache for `full`, compressive memory for Infini-attention), and averages the
next-token loss per bucket of target positions over all documents. A curve that stays flat (or
falls) with position means the model uses the long context; one that rises past the trained
length shows where it breaks.

Data: a prepared corpus folder (`data_prep/prepare_corpus.py`: a `datasets` folder with an
`input_ids` column; a `text` column is tokenized with the model's tokenizer) or a `.jsonl` file
with a `text` field.

Outputs: `OUT/ppl.json` = {"buckets": [{"start", "end", "ppl", "tokens"}, ...],
"ppl", "n_docs", ...} and the plot `OUT/ppl.png`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longcpt.errors import LongcptError
from longcpt.fsio import atomic_write_json
from longcpt.model.generation import DEFAULT_PREFILL_CHUNK, cache_use, forward_chunks, mean_cache_use

LOGIT_CHUNK = 1024  # hidden states turned into logits this many at a time ((t, V) float32 each)


def load_documents(path: str | Path, tokenizer, min_tokens: int, max_docs: int) -> tuple[list[list[int]], int]:
    """Up to `max_docs` token lists of at least `min_tokens` tokens, in file order.

    Returns:
        (documents, longest): the documents and the longest length seen (for the error message).

    Raises:
        LongcptError: unreadable data, or no document long enough.
    """
    path = Path(path)
    docs, longest = [], 0

    def consider(ids: list[int]) -> bool:
        nonlocal longest
        longest = max(longest, len(ids))
        if len(ids) >= min_tokens:
            docs.append(ids)
        return len(docs) >= max_docs

    if path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise LongcptError(f"--data {path}: not a prepared corpus ({e}); use data_prep/prepare_corpus.py") from None
        if "input_ids" in dataset.column_names:
            import pyarrow.compute as pc

            lengths = pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
            longest = max(lengths, default=0)
            for i, n in enumerate(lengths):
                if n >= min_tokens and consider(list(dataset[i]["input_ids"])):
                    break
        elif "text" in dataset.column_names:
            for text in dataset["text"]:
                if consider(tokenizer.encode(text, add_special_tokens=False)):
                    break
        else:
            raise LongcptError(f"--data {path}: no input_ids or text column (columns: {dataset.column_names})")
    elif path.is_file() and path.suffix == ".jsonl":
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise LongcptError(f"{path}:{line_no}: expected a JSON object with a text field") from None
                if consider(tokenizer.encode(text, add_special_tokens=False)):
                    break
    else:
        raise LongcptError(f"--data {path}: not found (a prepared corpus folder or a .jsonl file with text)")
    if not docs:
        raise LongcptError(
            f"--data {path}: no document has {min_tokens} tokens (the longest has {longest}); "
            f"lower --seq-len to at most {longest + 1} or pass longer documents"
        )
    return docs, longest


@torch.inference_mode()
def token_losses(
    model, ids: torch.Tensor, chunk: int = DEFAULT_PREFILL_CHUNK, progress=None, state: dict | None = None
) -> torch.Tensor:
    """Next-token losses (T-1,) of one sequence `ids` (T,), read in chunks through the model's state.

    Loss i is that of predicting token i+1 from tokens 0..i. `state` (an empty dict) lets the caller
    inspect the attention cores' state afterwards.
    """
    state = {} if state is None else state
    losses = []
    targets = ids[1:]
    for offset, hidden in forward_chunks(model, ids[None], state, chunk):  # hidden (1, t, C)
        for s in range(0, hidden.shape[1], LOGIT_CHUNK):
            h = hidden[0, s : s + LOGIT_CHUNK]  # (t', C)
            y = targets[offset + s : offset + s + h.shape[0]]  # the last position has no target
            logits = model.lm_head(h[: y.shape[0]]).float()  # (t', V)
            losses.append(F.cross_entropy(logits, y, reduction="none"))
        if progress is not None:
            progress(hidden.shape[1])
    return torch.cat(losses)


def bucket_ppl(losses: list[torch.Tensor], seq_len: int, width: int) -> list[dict]:
    """Perplexity per bucket of target positions [start, end), pooled over documents.

    Position p is the target position (the token being predicted), so the first bucket covers
    positions 1 .. width-1 (position 0, the BOS, is never predicted).
    """
    total = torch.stack(losses).double().sum(dim=0)  # (T-1,) summed over documents
    buckets = []
    for start in range(0, seq_len, width):
        end = min(start + width, seq_len)
        lo = max(start, 1) - 1  # loss index = target position - 1
        values = total[lo : end - 1]
        count = values.numel() * len(losses)
        buckets.append({"start": start, "end": end, "ppl": math.exp(values.sum().item() / count), "tokens": count})
    return buckets


def evaluate_ppl(model, tokenizer, docs: list[list[int]], seq_len: int, width: int, chunk: int, progress=None) -> dict:
    """Per-bucket and overall perplexity of the first `seq_len` tokens (BOS first) of each doc."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    task = progress.add_task("ppl", total=seq_len * len(docs)) if progress else None
    losses, kept, start = [], [], time.perf_counter()
    for doc in docs:
        ids = torch.tensor((bos + doc)[:seq_len])
        advance = (lambda n: progress.advance(task, n)) if progress else None
        state: dict = {}
        losses.append(token_losses(model, ids, chunk, advance, state))
        if (use := cache_use(state)) is not None:
            kept.append(use)
    seconds = time.perf_counter() - start
    overall = math.exp(torch.cat(losses).double().mean().item())
    return {
        "buckets": bucket_ppl(losses, seq_len, width),
        "ppl": overall,
        "n_docs": len(docs),
        "seq_len": seq_len,
        "bucket": width,
        "tokens_per_second": round(seq_len * len(docs) / seconds, 1) if seconds > 0 else None,
        **mean_cache_use(kept),
    }


def run(args) -> int:
    """The `longcpt eval ppl` command."""
    from longcpt.eval.figures import ppl_plot
    from longcpt.eval.loading import load_for_eval, model_label
    from longcpt.eval.progress import token_progress

    if args.seq_len < 2:
        raise LongcptError(f"--seq-len {args.seq_len}: must be >= 2")
    width = args.bucket or -(-args.seq_len // 8)  # 8 buckets by default
    model, tokenizer, settings = load_for_eval(args)
    bos = 1 if tokenizer.bos_token_id is not None else 0
    docs, _ = load_documents(args.data, tokenizer, args.seq_len - bos, args.max_docs)
    with token_progress() as progress:
        report = evaluate_ppl(model, tokenizer, docs, args.seq_len, width, args.chunk, progress)
    report.update(settings, data=str(args.data))
    output = Path(args.output)
    json_path = atomic_write_json(output / "ppl.json", report)
    title = f"{model_label(args.model, args.rope_scaling, settings['attention'])}: perplexity by position ({report['n_docs']} docs of {args.seq_len} tokens)"
    png_path = ppl_plot(report["buckets"], title, output / "ppl.png")
    for b in report["buckets"]:
        print(f"tokens {b['start']:>8} - {b['end']:<8} ppl {b['ppl']:.3f}")
    print(f"wrote {json_path} and {png_path}")
    return 0
