"""Tokenize text records into a `datasets` data set of documents (docs/reference.md, section 1).

    python data_prep/prepare_corpus.py --input 'raw/*.jsonl' --tokenizer tok/ --output data/ [--num-proc 2]

Output: `save_to_disk` folder, one row per document, column `input_ids` (no BOS/EOS), plus
`report.json` (read, kept, rejected with file:line and reason, tokens). With --val-fraction F,
`OUTPUT/train` and `OUTPUT/val`. Bad records are skipped and reported; the folder appears only
when complete. Front for `longcpt.data.prepare.prepare_corpus`.
"""

import argparse
import sys

from longcpt.errors import LongcptError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".jsonl/.json/.parquet/.txt files, folders or globs")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (train_tokenizer.py or an HF model)")
    parser.add_argument("--output", required=True, help="data set folder to write")
    parser.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    parser.add_argument("--num-proc", type=int, default=1,
                        help="tokenizing processes (default 1: the tokenizer then uses every core itself)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of documents held out as OUTPUT/val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation draw")
    parser.add_argument("--batch-size", type=int, default=1000, help="documents per tokenizer call")
    args = parser.parse_args(argv)
    try:
        from longcpt.data.prepare import prepare_corpus

        report = prepare_corpus(args.input, args.tokenizer, args.output, text_field=args.text_field,
                                num_proc=args.num_proc, val_fraction=args.val_fraction, seed=args.seed,
                                batch_size=args.batch_size)
    except LongcptError as e:
        print(f"prepare_corpus: error: {e}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{k}: {v['documents']} documents, {v['tokens']} tokens" for k, v in report["splits"].items())
    print(f"read {report['read']} records, kept {report['kept']}, rejected {report['rejected']} "
          f"-> {args.output} ({splits}); details in {args.output}/report.json")
    for r in report["rejections"][:10]:
        print(f"  skipped {r['location']}: {r['reason']}")
    if report["rejected"] > 10:
        print(f"  ... {report['rejected'] - 10} more in report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
