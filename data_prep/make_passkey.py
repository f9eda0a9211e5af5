"""Write passkey retrieval examples (Landmark format) as JSONL, exact in tokens of a tokenizer.

    python data_prep/make_passkey.py --tokenizer demo/tokenizer --lengths 1024 --depths random \
        --n 2000 --output data/passkey_train.jsonl          # fine-tuning data, needle anywhere
    python data_prep/make_passkey.py --tokenizer DIR --lengths 1024,4096 --depths 0,0.5,1 --n 5 \
        --output passkey_test.jsonl                          # a fixed sweep
    python data_prep/make_passkey.py --tokenizer DIR --lengths 96:2048:24 --depths random --n 110 \
        --split-digits --output long.jsonl                   # 24 lengths log-spaced over 96-2,048

--split-digits writes the key one digit per token (see `longcpt.data.passkey`); a model fine-tuned
on such data is evaluated with `longcpt eval passkey --split-digits`.

One row per example: id, length, depth, needle_depth, key, input_ids (the prompt, exactly
`length` tokens), answer_ids, prompt and answer text. The file appears only when complete.
A thin front over `longcpt.data.passkey` (see its docstring for the format).
"""

from __future__ import annotations

import argparse
import sys

from longcpt.argtypes import csv_list
from longcpt.data import load_tokenizer
from longcpt.data.passkey import log_spaced_lengths, write_passkey_jsonl
from longcpt.errors import LongcptError


def _depth(text: str) -> float | str:
    if text == "random":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"depth {text!r}: expected a number in [0, 1] or 'random'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"depth {value}: must be in [0, 1] (0 = start, 1 = end)")
    return value


def _lengths(text: str) -> list[int]:
    """`1024,4096`, or `LO:HI:N` for N lengths log-spaced from LO to HI."""
    if ":" not in text:
        return csv_list(int)(text)
    try:
        lo, hi, n = (int(part) for part in text.split(":"))
        return list(log_spaced_lengths(lo, hi, n))
    except (ValueError, LongcptError):
        raise argparse.ArgumentTypeError(f"lengths {text!r}: expected LO:HI:N with 0 < LO <= HI and N >= 2, "
                                         "e.g. 96:2048:24") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (or an exported model folder)")
    parser.add_argument("--lengths", type=_lengths, required=True,
                        help="prompt lengths in tokens, e.g. 1024,4096, or LO:HI:N for N log-spaced ones")
    parser.add_argument("--depths", type=csv_list(_depth), required=True, help="needle depths in [0, 1] or 'random'")
    parser.add_argument("--n", type=int, required=True, help="examples per (length, depth)")
    parser.add_argument("--output", required=True, help="output .jsonl file")
    parser.add_argument("--seed", type=int, default=0, help="fixes the keys (and random depths)")
    parser.add_argument("--split-digits", action="store_true",
                        help="write the key one digit per token (evaluate with `longcpt eval passkey --split-digits`)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n {args.n}: must be >= 1")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        count = write_passkey_jsonl(args.output, tokenizer, args.lengths, args.depths, args.n, args.seed,
                                    args.split_digits)
    except LongcptError as e:
        print(f"make_passkey: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} examples to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
