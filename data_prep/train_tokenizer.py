"""Train a byte-level BPE tokenizer on text records (docs/reference.md, section 1).

    python data_prep/train_tokenizer.py --input corpus.jsonl --vocab-size 4096 --output tok/

Writes a folder that `transformers.AutoTokenizer.from_pretrained(DIR)` loads, with BOS `<s>`,
EOS `</s>` and PAD `<pad>`. Front for `longcpt.data.tokenizer.train_tokenizer`.
"""

import argparse
import sys

from longcpt.errors import LongcptError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".jsonl/.json/.parquet/.txt files, folders or globs")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    parser.add_argument("--output", required=True, help="tokenizer folder to write")
    parser.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    parser.add_argument("--split-digits", action="store_true",
                        help="every digit a token of its own (as Llama's and Mistral's tokenizers)")
    args = parser.parse_args(argv)
    try:
        from longcpt.data.tokenizer import train_tokenizer

        info = train_tokenizer(args.input, args.vocab_size, args.output, text_field=args.text_field,
                               min_frequency=args.min_frequency, split_digits=args.split_digits)
    except LongcptError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer with {info['vocab_size']} tokens trained on {info['records']} records "
          f"({info['rejected']} rejected) -> {info['output']} (bos {info['bos_id']}, eos {info['eos_id']}, "
          f"pad {info['pad_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
