"""Prepare local BookSum files for fine-tuning and `longcpt eval booksum`.

    python data_prep/prepare_booksum.py --input booksum/test.csv --output data/booksum_test

Reads chapter-level files in the `kmfoda/booksum` schema (`chapter`, `summary_text`, ...) or
book-level files (`text`, `summary`), as .jsonl / .json / .parquet / .csv (globs allowed; one
split per run). Writes DIR/data (a `datasets` folder: id, text, summary, references) and
DIR/report.json (records read, kept, and each rejected one with `file:line` and the reason).
The folder appears only when complete. A thin front over `longcpt.data.booksum`.
"""

from __future__ import annotations

import argparse
import glob
import sys

from longcpt.data.booksum import prepare_booksum
from longcpt.errors import LongcptError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl .json .parquet .csv)")
    parser.add_argument("--output", required=True, help="output folder")
    args = parser.parse_args(argv)
    paths = []
    for pattern in args.input:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            print(f"prepare_booksum: error: --input {pattern}: no file matches", file=sys.stderr)
            return 2
        paths += matches
    try:
        report = prepare_booksum(paths, args.output)
    except LongcptError as e:
        print(f"prepare_booksum: error: {e}", file=sys.stderr)
        return 2
    print(f"read {report['read']} records, kept {report['kept']}, rejected {len(report['rejected'])} "
          f"(see {args.output}/report.json)")
    for r in report["rejected"][:5]:
        print(f"  rejected {r['where']}: {r['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
