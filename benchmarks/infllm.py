"""InfLLM (`infllm`): prefill time per token and memory against length, beside `full` with a KV cache.

One stream per kind, in a fresh process each (its own peak memory), fed through
`model.hidden_states(chunk, positions, state)` in chunks of `--chunk` tokens as generation does.
At each mark (16K, 64K, 256K, 1M tokens by default) a row reports:
  * us/token: wall time per token over the last `--window` tokens before the mark (the cost *at*
    that length, not averaged from the start); cpu us/token: the process's CPU time over the same
    tokens, which other processes on a shared machine barely disturb (run with OMP_NUM_THREADS=1
    to compare kinds on one core);
  * device MiB: what the layer states keep on the compute device that does not grow with the
    stream (`full`: the KV cache, which does; `infllm`: sinks, window, pending tokens and scores,
    block cache);
  * reps MiB: InfLLM's block representatives, on the compute device (they grow with the stream,
    Hq * D / block_size values per token and layer);
  * host MiB: the block keys and values the InfLLM store holds in host memory (grows linearly with
    the stream; pages are allocated ahead but become resident as blocks fill them, so the blocks
    are counted);
  * work MiB: the peak resident set above the resident size before the stream, minus the host
    store and, on a CPU, the representatives: activations, scores and the bounded device state
    (on CUDA: peak allocated memory minus the representatives);
`full` runs up to `--full-max` tokens (its KV cache grows linearly and each token attends to all
before it). A third table times one retrieval over the blocks of the longest stream: torch
(`retrieve_topk`: one matrix product and `topk`) against faiss's exact inner-product index
(`IndexFlatIP`) when faiss is importable; the reference offers faiss as an option.

Targets (issue 13): infllm time per token flat within 25% from 64K to 1M, work memory flat within
10%, at 64K at least 3x faster per token than `full`. Growth and speed-up are reported for both
wall and CPU time.

Model: the 4-layer x 256 Llama of the other benchmarks (8 heads / 4 KV heads, head dim 32, vocab
8192), random weights, float32; InfLLM options n_init 64, n_local 1024, block_size 64, topk 8,
repr_topk 4, exc_block_size 512, max_cached_block 16.

Run:  python benchmarks/infllm.py                 # to 1M tokens (CPU: long; see docs/infllm.md)
      python benchmarks/infllm.py --quick         # to 64K, full to 16K
Prints three tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import growth, max_resident_bytes, resident_bytes, size_label  # noqa: E402

from longcpt.argtypes import csv_list  # noqa: E402
from longcpt.model import CausalLM, ModelArgs  # noqa: E402
from longcpt.model.attention.infllm import retrieve_topk  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=1 << 21)
OPTIONS = dict(n_init=64, n_local=1024, block_size=64, topk=8, repr_topk=4, exc_block_size=512, max_cached_block=16)
MIB = 2**20


def peak_bytes(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return max_resident_bytes()


def state_bytes(state: dict) -> tuple[int, int, int]:
    """(device, representatives, host) bytes held by the layer states."""
    device = reps = host = 0
    for s in state.values():
        if hasattr(s, "device_bytes"):
            device, host = device + s.device_bytes(), host + s.host_bytes(stored=True)
            reps += s.reps_bytes()
        else:  # full: a KVCache, its allocated buffers
            device += sum(t.numel() * t.element_size() for t in (s.k, s.v) if t is not None)
    return device, reps, host


@torch.no_grad()
def stream(kind: str, length: int, marks: list[int], chunk: int, window: int, device: str) -> list[dict]:
    """Stream `length` random tokens through a `kind` model; one row per mark."""
    torch.manual_seed(0)
    options = OPTIONS if kind == "infllm" else {}
    model = CausalLM(ModelArgs(**MODEL, attention=kind, attention_options=options)).to(device).eval()
    g = torch.Generator().manual_seed(1)
    model.hidden_states(torch.zeros(1, 8, dtype=torch.long, device=device), state={})  # warm-up
    base = torch.cuda.memory_allocated() if device == "cuda" else resident_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    state: dict = {}
    rows, position, timed, started, cpu_started = [], 0, 0, None, 0.0
    while position < length:
        next_mark = min(m for m in marks if m > position)
        n = min(chunk, next_mark - position)  # a call ends at every mark, whatever the chunk size
        ids = torch.randint(0, MODEL["vocab_size"], (1, n), generator=g).to(device)
        positions = torch.arange(position, position + n, device=device)[None]
        if started is None and position + n > next_mark - window:  # the call reaches into the window
            started, cpu_started, timed = time.perf_counter(), time.process_time(), 0
        model.hidden_states(ids, position_ids=positions, state=state)
        position += n
        if started is not None:
            timed += n
        if position in marks:
            if device == "cuda":
                torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            dev, reps, host = state_bytes(state)
            work = peak_bytes(device) - base - reps - (host if device != "cuda" else 0)
            rows.append({"kind": kind, "length": position, "us_per_token": round(1e6 * seconds / timed, 1),
                         "cpu_us_per_token": round(1e6 * cpu / timed, 1),
                         "device_mib": round(dev / MIB, 2), "reps_mib": round(reps / MIB, 2),
                         "host_mib": round(host / MIB, 1), "work_mib": round(work / MIB, 1)})
            print("ROW " + json.dumps(rows[-1]), file=sys.stderr, flush=True)
            started = None
    return rows


def retrieval(n_blocks: int, reps: int) -> dict:
    """Seconds per retrieval of topk of `n_blocks` blocks: torch against faiss (if importable)."""
    g = torch.Generator().manual_seed(0)
    dim = MODEL["num_attention_heads"] * MODEL["head_dim"]
    keys = torch.randn(1, n_blocks, MODEL["num_attention_heads"], MODEL["head_dim"], generator=g)
    queries = torch.randn(reps, 1, MODEL["num_attention_heads"], MODEL["head_dim"], generator=g)
    k = OPTIONS["topk"]
    start = time.perf_counter()
    ours = [retrieve_topk(keys, q, k) for q in queries]
    out = {"blocks": n_blocks, "torch_us": round(1e6 * (time.perf_counter() - start) / reps, 1), "faiss_us": None}
    keys16, queries16 = keys.bfloat16(), queries.bfloat16()  # repr_dtype=bfloat16
    start = time.perf_counter()
    half = [retrieve_topk(keys16, q, k) for q in queries16]
    out["torch_bf16_us"] = round(1e6 * (time.perf_counter() - start) / reps, 1)
    out["bf16_same_blocks"] = sum(h.tolist() == o.tolist() for h, o in zip(half, ours)) / reps
    try:
        import faiss
    except ImportError:
        return out
    index = faiss.IndexFlatIP(dim)
    index.add(keys.reshape(n_blocks, dim).numpy())
    start = time.perf_counter()
    theirs = [index.search(q.reshape(1, dim).numpy(), k)[1] for q in queries]
    out["faiss_us"] = round(1e6 * (time.perf_counter() - start) / reps, 1)
    out["same_blocks"] = all(sorted(t[0].tolist()) == o[0].tolist() for t, o in zip(theirs, ours))
    return out


def in_subprocess(task: dict) -> list[dict]:
    """Run one stream in a fresh interpreter (its own peak memory)."""
    # A fixed mmap threshold returns every large freed buffer to the system at once, so the resident
    # size follows live memory rather than heap fragmentation.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], stdout=subprocess.PIPE,
                            text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"measurement {task} failed (exit {result.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="to 64K tokens, full to 16K")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--marks", type=csv_list(int), default=None,
                        help="comma-separated lengths (default 16K,64K,256K,1M)")
    parser.add_argument("--full-max", type=int, default=None, help="longest `full` stream (default 64K; 16K quick)")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per model call (generation's default)")
    parser.add_argument("--window", type=int, default=8192,
                        help="tokens timed before each mark (timing starts with the call that reaches into them, "
                             "so a window shorter than --chunk times that one call)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        print("RESULT " + json.dumps(stream(**task)))
        return

    for flag, value in (("--chunk", args.chunk), ("--window", args.window)):
        if value < 1:
            parser.error(f"{flag} {value}: must be >= 1 token")
    marks = args.marks or ([16384, 65536] if args.quick else [16384, 65536, 262144, 1 << 20])
    if marks[0] < 1 or marks != sorted(set(marks)):
        parser.error(f"--marks {','.join(map(str, marks))}: expected increasing positive lengths, e.g. 16384,65536")
    full_max = args.full_max or (16384 if args.quick else 65536)
    common = dict(chunk=args.chunk, window=args.window, device=args.device)
    rows = in_subprocess(dict(kind="infllm", length=marks[-1], marks=marks, **common))
    full_marks = [m for m in marks if m <= full_max]
    if full_marks:
        rows += in_subprocess(dict(kind="full", length=full_marks[-1], marks=full_marks, **common))
    search = retrieval(marks[-1] // OPTIONS["block_size"], reps=50)

    print(f"device={args.device} model={MODEL}\ninfllm options={OPTIONS}")
    print(f"{'kind':<7} {'tokens':>7} {'us/token':>9} {'cpu us/tok':>11} {'device MiB':>11} {'reps MiB':>9} "
          f"{'host MiB':>9} {'work MiB':>9} {'full/infllm cpu':>16} {'wall':>6}")
    full = {r["length"]: r for r in rows if r["kind"] == "full"}
    for r in sorted(rows, key=lambda r: (r["length"], r["kind"])):
        peer = full.get(r["length"]) if r["kind"] == "infllm" else None
        cpu_ratio = f"{peer['cpu_us_per_token'] / r['cpu_us_per_token']:.2f}x" if peer else ""
        wall_ratio = f"{peer['us_per_token'] / r['us_per_token']:.2f}x" if peer else ""
        print(f"{r['kind']:<7} {size_label(r['length']):>7} {r['us_per_token']:>9.1f} {r['cpu_us_per_token']:>11.1f} "
              f"{r['device_mib']:>11.2f} {r['reps_mib']:>9.2f} {r['host_mib']:>9.1f} {r['work_mib']:>9.1f} "
              f"{cpu_ratio:>16} {wall_ratio:>6}")
    host_rows = [r for r in rows if r["kind"] == "infllm" and r["host_mib"]]
    host_per_token = round(host_rows[-1]["host_mib"] * MIB / host_rows[-1]["length"], 1) if host_rows else None
    print(f"host store: {host_per_token} bytes per token")
    ratio = (f"{search['faiss_us'] / search['torch_us']:.2f}x faiss/torch time" if search["faiss_us"] else
             "faiss not installed")
    print(f"retrieval of top-{OPTIONS['topk']} of {search['blocks']} blocks: torch {search['torch_us']} us, "
          f"bf16 representatives {search['torch_bf16_us']} us (same blocks in {search['bf16_same_blocks']:.0%}), "
          f"faiss {search['faiss_us']} us ({ratio})")
    mid = 65536 if 65536 in marks[:-1] else marks[0]
    ours = {r["length"]: r for r in rows if r["kind"] == "infllm"}
    at = mid if mid in full else None

    def speedup(key: str) -> float | None:
        return round(full[at][key] / ours[at][key], 2) if at else None

    summary = {
        "benchmark": "infllm", "device": args.device, "model": MODEL, "options": OPTIONS, "rows": rows,
        "cpu_time_per_token_growth": growth(rows, "infllm", "cpu_us_per_token", mid, marks[-1]),
        "time_per_token_growth": growth(rows, "infllm", "us_per_token", mid, marks[-1]),
        "work_growth": growth(rows, "infllm", "work_mib", mid, marks[-1]),
        "device_growth": growth(rows, "infllm", "device_mib", mid, marks[-1]),
        "cpu_speedup_vs_full": speedup("cpu_us_per_token"), "speedup_vs_full": speedup("us_per_token"),
        "speedup_at": at, "host_bytes_per_token": host_per_token, "retrieval": search,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
