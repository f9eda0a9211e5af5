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
from pathlib import Path

import torch
import torch.nn.functional as F

from longcpt.errors import LongcptError
from longcpt.fsio import atomic_write_json
from longcpt.model.generation import DEFAULT_PREFILL_CHUNK, forward_chunks

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


def buckets_of(seq_len: int, width: int) -> list[tuple[int, int]]:
    """Buckets [start, end) of target positions; position 0 (the BOS) is never predicted, so the
    first bucket's losses are those of positions 1 .. width-1."""
    return [(start, min(start + width, seq_len)) for start in range(0, seq_len, width)]


def bucket_sums(losses: torch.Tensor, seq_len: int, width: int) -> list[float]:
    """One document's summed next-token losses per bucket (float64), from its losses (T-1,)."""
    values = losses.double()
    return [values[max(start, 1) - 1 : end - 1].sum().item() for start, end in buckets_of(seq_len, width)]


def bucket_ppl(sums: list[list[float]], seq_len: int, width: int) -> list[dict]:
    """Perplexity per bucket of target positions [start, end), pooled over documents (`bucket_sums`
    of each)."""
    buckets = []
    for i, (start, end) in enumerate(buckets_of(seq_len, width)):
        count = (end - max(start, 1)) * len(sums)  # loss index = target position - 1
        total = math.fsum(doc[i] for doc in sums)
        buckets.append({"start": start, "end": end, "ppl": math.exp(total / count), "tokens": count})
    return buckets


def doc_key(row: dict) -> int:
    return int(row["doc"])


def evaluate_ppl(model, tokenizer, docs: list[list[int]], seq_len: int, width: int, chunk: int, progress=None,
                 predictions=None) -> dict:
    """Per-bucket and overall perplexity of the first `seq_len` tokens (BOS first) of each doc.

    `predictions` (an open `longcpt.eval.predictions.Predictions`): documents already there are not
    read again, each new one is appended (its bucket sums) as it finishes.
    """
    from longcpt.eval.throughput import Meter, cache_report

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    done = predictions.done if predictions is not None else {}
    todo = [i for i in range(len(docs)) if i not in done]
    task = progress.add_task("ppl", total=seq_len * len(todo)) if progress else None
    meter = Meter()
    for i in todo:
        ids = torch.tensor((bos + docs[i])[:seq_len])
        advance = (lambda n: progress.advance(task, n)) if progress else None
        state: dict = {}
        losses = token_losses(model, ids, chunk, advance, state)
        use = meter.add(seq_len, state) or {}
        done[i] = {"doc": i, "sums": bucket_sums(losses, seq_len, width), **use}
        if predictions is not None:
            predictions.append(done[i])
    rows = [done[i] for i in range(len(docs))]
    sums = [row["sums"] for row in rows]
    overall = math.exp(math.fsum(x for doc in sums for x in doc) / ((seq_len - 1) * len(docs)))
    return {
        "buckets": bucket_ppl(sums, seq_len, width),
        "ppl": overall,
        "n_docs": len(docs),
        "seq_len": seq_len,
        "bucket": width,
        **meter.report(),
        **cache_report(rows),
    }


# Settings a resumed run must share with the documents already read (more --max-docs adds some).
RUN_KEYS = ("model", "data", "seq_len", "bucket", "rope_scaling", "attention", "attention_options")


def add_arguments(parser) -> None:
    """The flags of `longcpt eval ppl`."""
    from longcpt.argtypes import positive_int
    from longcpt.eval.loading import add_model_arguments

    add_model_arguments(parser, prefill_flag="--chunk")
    parser.add_argument("--data", required=True, help="prepared corpus (data_prep/prepare_corpus.py) of long documents")
    parser.add_argument("--seq-len", type=positive_int, required=True)
    parser.add_argument("--output", required=True, help="output folder (an interrupted run resumes there)")
    parser.add_argument("--bucket", type=positive_int, default=None, help="bucket width in tokens (default: seq_len/8, rounded up)")
    parser.add_argument("--max-docs", type=positive_int, default=32)


def run(args) -> int:
    """The `longcpt eval ppl` command."""
    from longcpt.eval.figures import ppl_plot
    from longcpt.eval.loading import load_for_eval, model_label
    from longcpt.eval.predictions import Predictions
    from longcpt.eval.progress import token_progress

    if args.seq_len < 2:
        raise LongcptError(f"--seq-len {args.seq_len}: must be >= 2")
    width = args.bucket or -(-args.seq_len // 8)  # 8 buckets by default
    model, tokenizer, settings = load_for_eval(args)
    bos = 1 if tokenizer.bos_token_id is not None else 0
    docs, _ = load_documents(args.data, tokenizer, args.seq_len - bos, args.max_docs)
    run_settings = {**settings, "model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()),
                    "seq_len": args.seq_len, "bucket": width}
    with token_progress() as progress, Predictions(args.output, run_settings, RUN_KEYS, doc_key,
                                                   "longcpt eval ppl") as predictions:
        report = evaluate_ppl(model, tokenizer, docs, args.seq_len, width, args.chunk, progress, predictions)
    report.update(settings, data=str(args.data))
    output = Path(args.output)
    json_path = atomic_write_json(output / "ppl.json", report)
    title = f"{model_label(args.model, args.rope_scaling, settings['attention'])}: perplexity by position ({report['n_docs']} docs of {args.seq_len} tokens)"
    png_path = ppl_plot(report["buckets"], title, output / "ppl.png")
    for b in report["buckets"]:
        print(f"tokens {b['start']:>8} - {b['end']:<8} ppl {b['ppl']:.3f}")
    print(f"wrote {json_path} and {png_path}")
    return 0
