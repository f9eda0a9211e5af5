"""Write RULER-style task samples as JSONL, exact in tokens of a tokenizer.

    python data_prep/make_ruler.py --tokenizer demo/tokenizer --tasks niah_single,vt \
        --lengths 384,512 --n 1000 --seed 1000 --output data/ruler_train.jsonl

One row per sample: id, task, length, index, input_ids (the prompt), references, prompt and
answer text, and `text` = prompt + answer (a training document: `prepare_corpus.py` reads it).
Samples depend only on (seed, task, length, index): use another --seed than the evaluation's
(`longcpt eval ruler --seed`, default 0) for training data. The file appears only when complete.
A thin front over `longcpt.data.ruler` (see its docstring for the tasks).
"""

from __future__ import annotations

import argparse
import json
import sys

from longcpt.argtypes import csv_list
from longcpt.data import load_tokenizer
from longcpt.data.ruler import TASKS, load_haystack, make_ruler_examples
from longcpt.errors import LongcptError
from longcpt.fsio import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (or an exported model folder)")
    parser.add_argument("--tasks", type=csv_list(str), required=True, help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--lengths", type=csv_list(int), required=True, help="prompt lengths in tokens, e.g. 384,512")
    parser.add_argument("--n", type=int, required=True, help="samples per (task, length)")
    parser.add_argument("--output", required=True, help="output .jsonl file")
    parser.add_argument("--seed", type=int, default=0, help="fixes every sample")
    parser.add_argument("--haystack", default=None, help="real text for niah/vt (as `longcpt eval ruler --haystack`)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n {args.n}: must be >= 1")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        haystack = load_haystack(args.haystack, tokenizer, 2 * max(args.lengths)) if args.haystack else None
        rows = make_ruler_examples(tokenizer, args.tasks, args.lengths, args.n, args.seed, haystack)
        lines = [json.dumps(row) for row in rows]
        atomic_write_text(args.output, "\n".join(lines) + "\n")
    except LongcptError as e:
        print(f"make_ruler: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(lines)} samples to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
