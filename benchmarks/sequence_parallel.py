"""Sequence parallelism (Ulysses): per-rank activation memory and step time, 1 rank vs 2 ranks.

One training step (loss + backward) of the 4-layer x 256 model on one packed window of L tokens,
side by side: 1 rank holding the whole window, and 2 ranks sharing it with
`strategy.sequence_parallel=2` (CPU processes over gloo, one thread each: one "device" per
rank). Each (kind, ranks, L) runs in fresh processes so every peak is its own. Documents are
random, about 2K tokens on average (`attention.kind=anchor` by default; `--kinds full,anchor`).

Memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set (VmHWM) during the
measured steps above the resident size just before them, with glibc's mmap threshold fixed so
freed buffers leave the resident set (as benchmarks/infini_memory.py). That is the step's work
memory: activations kept for the backward, the loss chunk and transient buffers (gradients are
allocated by a warm-up step before). Reported per rank, the largest of the ranks.
Time: best of `--reps` steps, the slowest rank's.

Target (issue 15): at 32K, per-rank memory with 2 ranks <= 0.6x one rank's.

Run:  python benchmarks/sequence_parallel.py                  # 8K, 16K, 32K, anchor (CPU: ~10 min)
      python benchmarks/sequence_parallel.py --lengths 4096 --reps 1
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import document_lengths, size_label  # noqa: E402

from longcpt.batch import cu_seqlens_for, position_ids  # noqa: E402
from longcpt.model import CausalLM, ModelArgs  # noqa: E402
from longcpt.model.attention import kind_spec  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=1 << 17)
MEAN_DOCUMENT = 2048
MIB = 2**20


def status_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def window(kind: str, length: int) -> dict[str, torch.Tensor]:
    """One packed row of `length` tokens: random ids, aligned labels, the kind's positions."""
    g = torch.Generator().manual_seed(length)
    lens = document_lengths(length, max(1, length // MEAN_DOCUMENT), seed=length, equal=False)
    cu = cu_seqlens_for([lens])
    ids = torch.randint(3, MODEL["vocab_size"], (1, length), generator=g)
    return {"input_ids": ids, "labels": ids.roll(-1, dims=1), "cu_seqlens": cu,
            "position_ids": position_ids(kind_spec(kind).positions, cu, 1, length)}


def run_worker(task: dict) -> dict:
    """One rank: a warm-up step, then `reps` measured steps on the task's window."""
    import torch.distributed as dist

    from longcpt.model.attention.ulysses import SequenceParallel
    from longcpt.strategies import sequence_parallel_group

    torch.set_num_threads(1)
    device = task["device"]
    torch.manual_seed(0)
    model = CausalLM(ModelArgs(**MODEL, attention=task["kind"])).to(device)
    if task["ranks"] > 1:
        dist.init_process_group("gloo")
        model.sequence_parallel = SequenceParallel.of(sequence_parallel_group(task["ranks"]))

    def step(length: int) -> None:
        b = {k: v.to(device) for k, v in window(task["kind"], length).items()}
        model.loss(b["input_ids"], b["labels"], b["position_ids"], b["cu_seqlens"]).backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated: not part of the step's work
        if device == "cuda":
            torch.cuda.synchronize()

    step(min(task["length"], 2048))  # warm-up: gradients, lazy initialisation, the process group
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / MIB
    else:
        base = status_mib("VmRSS")
    seconds = []
    for _ in range(task["reps"]):
        start = time.perf_counter()
        step(task["length"])
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / MIB if device == "cuda" else status_mib("VmHWM")
    return {"work_mib": round(peak - base, 1), "seconds": round(min(seconds), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(kind: str, ranks: int, length: int, reps: int, device: str) -> dict:
    """Run one setting in `ranks` fresh processes; the largest memory and the slowest time of the ranks."""
    task = {"kind": kind, "ranks": ranks, "length": length, "reps": reps, "device": device}
    port = str(free_port())
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, WORLD_SIZE=str(ranks), PYTHONPATH=str(SRC))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(task)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r)}) for r in range(ranks)]
    outs = [p.communicate() for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"measurement {task} failed:\n{err[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return {"kind": kind, "tokens": length, "ranks": ranks, "work_mib": max(r["work_mib"] for r in results),
            "seconds": max(r["seconds"] for r in results)}


def table(rows: list[dict]) -> str:
    lines = [f"{'kind':<9} {'tokens':>6} {'ranks':>5} {'MiB/rank':>9} {'vs 1':>5} {'step s':>7} {'speedup':>7}"]
    one = {(r["kind"], r["tokens"]): r for r in rows if r["ranks"] == 1}
    for r in rows:
        base = one[r["kind"], r["tokens"]]
        lines.append(f"{r['kind']:<9} {size_label(r['tokens']):>6} {r['ranks']:>5} {r['work_mib']:>9.1f} "
                     f"{r['work_mib'] / base['work_mib']:>5.2f} {r['seconds']:>7.2f} {base['seconds'] / r['seconds']:>6.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,16384,32768", help="window lengths (tokens), comma-separated")
    parser.add_argument("--kinds", default="anchor", help="attention kinds: full, intra_doc, anchor")
    parser.add_argument("--reps", type=int, default=2, help="measured steps per setting (best time)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for kind in args.kinds.split(","):
        for length in lengths:
            for ranks in (1, 2):
                rows.append(measure(kind, ranks, length, args.reps, args.device))
                print(f"  {kind} {size_label(length)} ranks={ranks}: {rows[-1]['work_mib']} MiB, "
                      f"{rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"device={args.device} threads/rank=1 model={MODEL} mean document={MEAN_DOCUMENT} tokens "
          f"load={load:.1f} ({os.cpu_count()} cores) torch={torch.__version__} {platform.machine()}")
    print(table(rows))
    one = {(r["kind"], r["tokens"]): r for r in rows if r["ranks"] == 1}
    ratios = {f"{r['kind']}_{size_label(r['tokens'])}": round(r["work_mib"] / one[r["kind"], r["tokens"]]["work_mib"], 3)
              for r in rows if r["ranks"] == 2}
    speedups = {f"{r['kind']}_{size_label(r['tokens'])}": round(one[r["kind"], r["tokens"]]["seconds"] / r["seconds"], 3)
                for r in rows if r["ranks"] == 2}
    print(json.dumps({"benchmark": "sequence_parallel", "device": args.device, "model": MODEL, "rows": rows,
                      "memory_ratio_2_ranks": ratios, "speedup_2_ranks": speedups, "load_average": load,
                      "target_memory_ratio_32K": 0.6}))


if __name__ == "__main__":
    main()
