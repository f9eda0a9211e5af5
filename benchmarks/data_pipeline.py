"""Data pipeline benchmark: prepare+pack throughput vs raw `tokenizers`, packing efficiency, peak RSS.

    python benchmarks/data_pipeline.py            # >= 200 MB corpus (several minutes on 2 cores)
    python benchmarks/data_pipeline.py --quick    # 20 MB, for a check that it works

Side by side in one run, on the same corpus and cores:
- raw: `tokenizers` `encode_batch_fast` (its fastest call; texts already in memory, batches of
  1000) over every document;
- ours: `prepare_corpus` (read + validate JSON lines, tokenize with `datasets.map`, save) and then
  packing every document into windows (`WindowStream`, chunk), in a fresh process.
Packing efficiency = non-pad tokens / all tokens, for chunk and bfd, on the prepared documents.
Peak memory of the prepare+pack process, on the full corpus and on a quarter of it: peak RSS
(VmHWM; it includes the memory-mapped Arrow files the kernel can drop at will) and peak
anonymous RSS (sampled RssAnon: the memory the process really holds).

The corpus is the demo corpus (standard-library sources and docstrings) repeated with the lines
of every document shuffled differently in each copy, until it reaches --size-mb.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from longcpt.data.demo_corpus import build_demo_corpus  # noqa: E402


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> dict:
    """Write `path` (jsonl) of at least size_mb MB: demo documents, lines shuffled per copy."""
    demo = build_demo_corpus(path.parent / "demo")
    docs = [json.loads(line)["text"] for line in demo.read_text().splitlines()]
    rng = np.random.default_rng(seed)
    target, written, n, copy = size_mb * 1e6, 0, 0, 0
    with open(path, "w") as f:
        while written < target:
            for text in docs:
                lines = text.split("\n")
                if copy:
                    lines = [lines[i] for i in rng.permutation(len(lines))]
                body = "\n".join(lines)
                f.write(json.dumps({"text": body}, ensure_ascii=False) + "\n")
                written += len(body.encode())
                n += 1
                if written >= target:
                    break
            copy += 1
    return {"documents": n, "text_mb": written / 1e6, "file_mb": path.stat().st_size / 1e6}


def raw_encode(corpus: Path, tokenizer: Path, batch_size: int = 1000) -> dict:
    """Time `encode_batch_fast` alone over the corpus, loaded batch by batch (loading not timed)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    seconds, tokens, nbytes = 0.0, 0, 0
    with open(corpus) as f:
        while True:
            texts = [json.loads(line)["text"] for _, line in zip(range(batch_size), f)]
            if not texts:
                break
            nbytes += sum(len(t.encode()) for t in texts)
            t0 = time.perf_counter()
            enc = tok.encode_batch_fast(texts, add_special_tokens=False)
            seconds += time.perf_counter() - t0
            tokens += sum(len(e.ids) for e in enc)
    return {"seconds": seconds, "tokens": tokens, "mb": nbytes / 1e6}


class AnonPeak:
    """Samples RssAnon of this process from /proc every 20 ms (Linux)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                for line in open("/proc/self/status"):
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child_prepare_and_pack(args) -> None:
    """In a fresh process: prepare_corpus, then pack every document (chunk); print JSON."""
    from longcpt.data.prepare import prepare_corpus
    from longcpt.data.stream import TokenStore, WindowStream
    from longcpt.data.tokenizer import load_tokenizer

    load_tokenizer(args.tokenizer)  # import transformers/torch before timing (not data work)
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        report = prepare_corpus([args.input], args.tokenizer, args.output, num_proc=args.num_proc, progress=False)
        t1 = time.perf_counter()
        store = TokenStore(args.output)
        stream = WindowStream(store.lengths, args.seq_len, "chunk", seed=0)
        windows = real = 0
        for w in stream.windows(store, epochs=1, bos_id=1, eos_id=2, pad_id=0):
            windows += 1
            real += args.seq_len - (w["doc_lens"][-1] if w["input_ids"][-1] == 0 else 0)
        t2 = time.perf_counter()
    print(json.dumps({
        "prepare_s": t1 - t0, "pack_s": t2 - t1, "tokens": report["tokens"], "documents": report["kept"],
        "windows": windows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_anon_mb": anon.peak / 2**20,
    }))


def run_child(corpus: Path, tokenizer: Path, output: Path, seq_len: int, num_proc: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--input", str(corpus), "--tokenizer", str(tokenizer),
           "--output", str(output), "--seq-len", str(seq_len), "--num-proc", str(num_proc)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"prepare child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def efficiency(data: Path, seq_len: int, strategy: str) -> float:
    from longcpt.data.packing import plan_windows
    from longcpt.data.stream import TokenStore

    lengths = TokenStore(data).lengths.tolist()
    windows = used = 0
    for plan in plan_windows(lengths, seq_len, strategy):
        windows += 1
        used += sum(p.size for p in plan)
    return used / (windows * seq_len)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="corpus text size (default 200)")
    parser.add_argument("--quick", action="store_true", help="20 MB corpus, for a quick check")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_prepare_and_pack(args)
        return 0
    size = 20.0 if args.quick else args.size_mb
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="longcpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from longcpt.data.tokenizer import train_tokenizer

    corpus_info = make_corpus(work / "corpus.jsonl", size)
    quarter_info = make_corpus(work / "quarter.jsonl", size / 4)
    train_tokenizer([work / "demo" / "corpus.jsonl"], args.vocab_size, work / "tok")

    raw = raw_encode(work / "corpus.jsonl", work / "tok")
    ours = run_child(work / "corpus.jsonl", work / "tok", work / "data", args.seq_len, args.num_proc)
    quarter = run_child(work / "quarter.jsonl", work / "tok", work / "data_quarter", args.seq_len, args.num_proc)
    eff = {s: efficiency(work / "data", args.seq_len, s) for s in ("chunk", "bfd")}

    mb = raw["mb"]
    raw_mbps = mb / raw["seconds"]
    ours_s = ours["prepare_s"] + ours["pack_s"]
    ours_mbps = mb / ours_s
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = [
        ("corpus", f"{mb:.0f} MB text, {corpus_info['documents']} documents, {raw['tokens']} tokens, {cores} cores"),
        ("raw encode_batch_fast", f"{raw['seconds']:.1f} s  {raw_mbps:.2f} MB/s  {raw['tokens'] / raw['seconds']:,.0f} tok/s"),
        ("ours prepare+pack", f"{ours_s:.1f} s  {ours_mbps:.2f} MB/s  (prepare {ours['prepare_s']:.1f} s, "
                              f"pack {ours['pack_s']:.1f} s, {ours['windows']} windows of {args.seq_len})"),
        ("ours / raw", f"{ours_mbps / raw_mbps:.1%}  (target >= 70%)"),
        ("packing efficiency chunk", f"{eff['chunk']:.4%}  (target >= 99.9%)"),
        ("packing efficiency bfd", f"{eff['bfd']:.4%}  (target >= 98%)"),
        ("peak RSS / anon, full", f"{ours['peak_rss_mb']:.0f} MB / {ours['peak_anon_mb']:.0f} MB"),
        ("peak RSS / anon, quarter", f"{quarter['peak_rss_mb']:.0f} MB / {quarter['peak_anon_mb']:.0f} MB "
                                     f"({quarter_info['text_mb']:.0f} MB corpus)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'data pipeline':<{width}}  result")
    print("-" * (width + 60))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({
        "benchmark": "data_pipeline", "corpus_mb": round(mb, 1), "documents": corpus_info["documents"],
        "tokens": raw["tokens"], "cores": cores, "seq_len": args.seq_len, "num_proc": args.num_proc,
        "raw_mb_per_s": round(raw_mbps, 3), "ours_mb_per_s": round(ours_mbps, 3),
        "ours_over_raw": round(ours_mbps / raw_mbps, 4), "prepare_s": round(ours["prepare_s"], 2),
        "pack_s": round(ours["pack_s"], 2), "raw_s": round(raw["seconds"], 2),
        "efficiency_chunk": round(eff["chunk"], 6), "efficiency_bfd": round(eff["bfd"], 6),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1), "peak_anon_mb": round(ours["peak_anon_mb"], 1),
        "peak_rss_mb_quarter": round(quarter["peak_rss_mb"], 1),
        "peak_anon_mb_quarter": round(quarter["peak_anon_mb"], 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
