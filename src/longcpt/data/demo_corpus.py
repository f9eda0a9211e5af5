"""A demo corpus from text every Python install has: the standard library's sources and docstrings.

    python -m longcpt.data.demo_corpus --output demo/corpus     # -> demo/corpus/corpus.jsonl

Documents of very different lengths, as long-context training wants: whole module sources (up to
`max_doc_chars`, tens of thousands of tokens) next to the docstrings of their classes and
functions (tens to hundreds of tokens). Modules are visited in a fixed pseudo-random order, so the
corpus is deterministic for a given Python installation and covers the whole library rather
than its alphabetical start. One JSON object per line: `id`, `source`, `kind`, `text`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from longcpt.fsio import atomic_write_text

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}
MIN_DOCSTRING_CHARS = 80  # shorter docstrings ("Return x.") teach little and mostly repeat


def _stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # prune: never enter tests or site-packages
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(stdlib).as_posix())
    random.Random(0).shuffle(files)  # fixed order that spreads over the whole library
    return files


def _documents(path: Path, name: str, max_doc_chars: int) -> Iterator[dict]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return  # a few files are templates or in other encodings: not needed
    if source.strip():
        cut = source[:max_doc_chars]
        if len(source) > max_doc_chars:
            cut = cut[: cut.rfind("\n") + 1] or cut  # end at a line boundary
        yield {"source": name, "kind": "module", "text": cut}
    for node in _definitions(tree):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
            title = name if isinstance(node, ast.Module) else f"{name}.{node.name}"
            yield {"source": title, "kind": "docstring", "text": doc}


def _definitions(node: ast.AST) -> Iterator[ast.AST]:
    """The module, classes and functions in source order, visiting statements only (docstrings
    live nowhere else; skipping expressions makes this several times faster than `ast.walk`)."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, ()):
            if isinstance(child, (ast.stmt, ast.excepthandler)):
                yield from _definitions(child)


def build_demo_corpus(
    output: str | Path,
    *,
    max_docs: int = 4000,
    max_bytes: int = 6_000_000,
    max_doc_chars: int = 60_000,
    stdlib: str | Path | None = None,
) -> Path:
    """Write `OUTPUT/corpus.jsonl` from the standard library's sources and docstrings.

    Args:
        output: folder to write into (created if needed).
        max_docs: stop after this many documents.
        max_bytes: stop once the texts reach this many UTF-8 bytes.
        max_doc_chars: a module source longer than this is cut at a line boundary.
        stdlib: the library folder to read (default: this Python's standard library).

    Returns:
        Path of the jsonl file (written atomically).
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    lines, size = [], 0
    for path in _stdlib_files(root):
        name = path.relative_to(root).as_posix()
        for doc in _documents(path, name, max_doc_chars):
            doc = {"id": len(lines), **doc}
            lines.append(json.dumps(doc, ensure_ascii=False))
            size += len(doc["text"].encode("utf-8"))
            if len(lines) >= max_docs or size >= max_bytes:
                break
        if len(lines) >= max_docs or size >= max_bytes:
            break
    return atomic_write_text(Path(output) / "corpus.jsonl", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longcpt.data.demo_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder for corpus.jsonl")
    parser.add_argument("--max-docs", type=int, default=4000)
    parser.add_argument("--max-bytes", type=int, default=6_000_000)
    args = parser.parse_args(argv)
    path = build_demo_corpus(args.output, max_docs=args.max_docs, max_bytes=args.max_bytes)
    with open(path) as f:
        n = sum(1 for _ in f)
    print(f"wrote {n} documents to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
