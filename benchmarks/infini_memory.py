"""Infini-attention: peak memory and time per token against length (docs/benchmarks.md).

Two tables, side by side with `full` attention where it fits:
  * training: one step (loss, one backward, AdamW) on one sequence of L tokens. Infini runs
    segment-major (`model.loss`); `full` runs its layer-major loss. Each (kind, L) runs in a fresh
    process so its peak is its own.
  * inference: Infini streams one sequence through `model.hidden_states(chunk, positions, state)`
    in chunks of one segment up to 1M tokens (peak memory and time per token as the stream
    grows); `full` runs one forward over L tokens (no KV cache in this measure).

Memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak resident set size
(getrusage), reported whole ("peak") and above the resident size just before the measured work
("work": activations, gradients, optimizer state, the stream's state), with glibc's mmap
threshold fixed so that freed buffers leave the resident set (see `in_subprocess`). Targets (issue #6):
Infini training memory grows at most 10% from 8K to 64K, inference memory is flat to 1M, time
per token constant within 20%.

Model: a small Llama (4 layers, 256 wide, 8 heads / 4 KV heads, vocab 8192), random weights.

Run:  python benchmarks/infini_memory.py            # 4K..64K training, 1M streaming (CPU: ~15 min)
      python benchmarks/infini_memory.py --quick    # 1K..8K, 64K streaming, 512-token segments
Prints two tables and one JSON line.
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

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import growth, max_resident_bytes, resident_bytes  # noqa: E402

from longcpt.model import CausalLM, ModelArgs  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=1 << 21)
MIB = 2**20


def build(kind: str, segment_len: int, device: str) -> CausalLM:
    torch.manual_seed(0)
    options = {"segment_len": segment_len, "bptt_segments": 2} if kind == "infini" else {}
    return CausalLM(ModelArgs(**MODEL, attention=kind, attention_options=options)).to(device)


class Peak:
    """Peak memory of the work done between `start()` and `read()`."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = resident_bytes()

    def read(self) -> tuple[float, float]:
        """(peak MiB, MiB above the start)."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = max_resident_bytes()
        return peak / MIB, (peak - self.base) / MIB


def train_step(kind: str, length: int, segment_len: int, device: str) -> dict:
    model = build(kind, segment_len, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)

    def step(n: int) -> None:
        ids = torch.randint(0, MODEL["vocab_size"], (1, n), generator=g).to(device)
        loss = model.loss(ids, ids.roll(-1, dims=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(min(length, segment_len))  # warm-up: lazy initialisation and optimizer state
    peak = Peak(device)
    peak.start()
    start = time.perf_counter()
    step(length)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    total, work = peak.read()
    return {"kind": kind, "length": length, "peak_mib": round(total, 1), "work_mib": round(work, 1),
            "us_per_token": round(1e6 * seconds / length, 1)}


@torch.no_grad()
def full_forward(length: int, device: str) -> dict:
    model = build("full", 0, device).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    model.hidden_states(ids[:, :256])  # warm-up
    peak = Peak(device)
    peak.start()
    start = time.perf_counter()
    model.hidden_states(ids)
    seconds = time.perf_counter() - start
    total, work = peak.read()
    return {"kind": "full", "length": length, "peak_mib": round(total, 1), "work_mib": round(work, 1),
            "us_per_token": round(1e6 * seconds / length, 1)}


@torch.no_grad()
def stream(length: int, segment_len: int, marks: list[int], device: str) -> list[dict]:
    """Stream `length` tokens one segment per call; a row at each mark (tokens so far)."""
    model = build("infini", segment_len, device).eval()
    g = torch.Generator().manual_seed(1)
    state: dict = {}
    model.hidden_states(torch.zeros(1, 8, dtype=torch.long, device=device))  # warm-up (no state)
    peak = Peak(device)
    peak.start()
    rows, position, last_time, last_position = [], 0, time.perf_counter(), 0
    while position < length:
        n = min(segment_len, length - position)
        ids = torch.randint(0, MODEL["vocab_size"], (1, n), generator=g).to(device)
        positions = torch.arange(position, position + n, device=device)[None]
        model.hidden_states(ids, position_ids=positions, state=state)
        position += n
        if position in marks:
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            total, work = peak.read()
            state_mib = sum(s.nbytes() for s in state.values()) / MIB
            rows.append({"kind": "infini", "length": position, "peak_mib": round(total, 1), "work_mib": round(work, 1),
                         "us_per_token": round(1e6 * (now - last_time) / (position - last_position), 1),
                         "state_mib": round(state_mib, 3)})
            last_time, last_position = now, position
    return rows


def run_worker(task: dict) -> None:
    device = task["device"]
    if task["what"] == "train":
        out = train_step(task["kind"], task["length"], task["segment_len"], device)
    elif task["what"] == "forward":
        out = full_forward(task["length"], device)
    else:
        out = stream(task["length"], task["segment_len"], task["marks"], device)
    print("RESULT " + json.dumps(out))


def in_subprocess(task: dict) -> dict | list:
    """Run one measurement in a fresh interpreter (its own peak memory)."""
    # A fixed mmap threshold makes glibc return every large freed buffer to the system at once;
    # with its default (dynamic) threshold, freed activation buffers stay in the heap and the
    # resident size grows with fragmentation (here, with the number of segments) rather than with
    # live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], capture_output=True, text=True,
                            env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"measurement {task} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(title: str, rows: list[dict]) -> str:
    lines = [title, f"{'kind':<7} {'tokens':>9} {'peak MiB':>9} {'work MiB':>9} {'us/token':>9}"]
    for r in rows:
        lines.append(f"{r['kind']:<7} {r['length']:>9} {r['peak_mib']:>9.1f} {r['work_mib']:>9.1f} {r['us_per_token']:>9.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (1K..8K training, 64K streaming)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--segment-len", type=int, default=None, help="default 2048 (512 with --quick)")
    parser.add_argument("--train-lengths", default=None, help="comma-separated, default 4096..65536")
    parser.add_argument("--full-max", type=int, default=None, help="longest `full` run (default 16384; 4096 quick)")
    parser.add_argument("--stream-length", type=int, default=None, help="default 1048576 (65536 quick)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return

    quick = args.quick
    segment = args.segment_len or (512 if quick else 2048)
    lengths = [int(x) for x in args.train_lengths.split(",")] if args.train_lengths else (
        [1024, 2048, 4096, 8192] if quick else [4096, 8192, 16384, 32768, 65536])
    full_max = args.full_max or (4096 if quick else 16384)
    stream_length = args.stream_length or (65536 if quick else 1 << 20)
    marks = sorted({m for m in (stream_length // 16, stream_length // 8, stream_length // 4, stream_length // 2,
                                stream_length) if m % segment == 0 or m == stream_length})
    device = args.device

    train_rows = []
    for length in lengths:
        for kind in ("infini", "full"):
            if kind == "full" and length > full_max:
                continue
            train_rows.append(in_subprocess({"what": "train", "kind": kind, "length": length,
                                             "segment_len": segment, "device": device}))
    infer_rows = [in_subprocess({"what": "forward", "length": n, "device": device}) for n in lengths if n <= full_max]
    infer_rows += in_subprocess({"what": "stream", "length": stream_length, "segment_len": segment, "marks": marks,
                                 "device": device})

    print(f"device={device} segment_len={segment} model={MODEL}")
    print(table("training step (loss + backward + AdamW), one sequence", train_rows))
    print()
    print(table("inference (infini: streaming in segments; full: one forward)", infer_rows))
    mid = 8192 if 8192 in lengths[:-1] else lengths[0]  # the target: growth from 8K to the longest
    summary = {
        "benchmark": "infini_memory", "device": device, "segment_len": segment, "model": MODEL,
        "train": train_rows, "inference": infer_rows,
        "train_work_growth": growth(train_rows, "infini", "work_mib", mid, lengths[-1]),
        "train_peak_growth": growth(train_rows, "infini", "peak_mib", mid, lengths[-1]),
        "train_time_per_token_growth": growth(train_rows, "infini", "us_per_token", mid, lengths[-1]),
        "stream_peak_growth": growth(infer_rows, "infini", "peak_mib", marks[0], marks[-1]),
        "stream_time_per_token_growth": growth(infer_rows, "infini", "us_per_token", marks[0], marks[-1]),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
