"""Mix prepared data sets by token share, upsampling long documents within each source.

    python data_prep/mix.py --input data/code:0.3 data/books:0.3 data/web:0.4 --output data/mix \
        --upsample-long 8192:2 32768:4 --seed 0

Prints and saves (`OUTPUT/report.json`) the token share per source and per length bucket.
Front for `longcpt.data.mix.mix_datasets`; see there for the sampling rule.
"""

import argparse
import sys

from longcpt.errors import LongcptError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="DIR:WEIGHT",
                        help="prepared data set folder and its weight (weights are normalised to token shares)")
    parser.add_argument("--output", required=True, help="mixed data set folder to write")
    parser.add_argument("--upsample-long", nargs="*", default=[], metavar="MIN_TOKENS:FACTOR",
                        help="draw documents of at least MIN_TOKENS tokens FACTOR times as often, within each source")
    parser.add_argument("--total-tokens", type=int, default=None,
                        help="size of the mix in tokens (default: the largest mix with no extra repetition)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--buckets", default="1024,4096,16384,65536", help="length bucket edges for the report")
    args = parser.parse_args(argv)
    try:
        from longcpt.data.mix import format_report, mix_datasets, parse_source, parse_upsample

        try:
            buckets = [int(b) for b in args.buckets.split(",") if b.strip()]
        except ValueError:
            raise LongcptError(f"--buckets {args.buckets!r}: expected comma-separated token counts") from None
        report = mix_datasets([parse_source(s) for s in args.input], args.output,
                              upsample_long=[parse_upsample(u) for u in args.upsample_long],
                              total_tokens=args.total_tokens, seed=args.seed, buckets=buckets)
    except LongcptError as e:
        print(f"mix: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"-> {args.output} ({report['documents']} documents, {report['tokens']} tokens); "
          f"report in {args.output}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
