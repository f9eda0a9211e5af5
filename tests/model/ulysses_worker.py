"""One rank of the sequence-parallel equivalence check (started by test_ulysses.py).

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python ulysses_worker.py OUT_DIR

(the test starts the ranks as fork server children, which call `main([OUT_DIR])`).

Every rank builds the same tiny model (seeded), computes the loss and gradients of each case with
sequence parallelism over gloo, averages the gradients over all ranks as DDP and DeepSpeed do,
and compares them with one process running the same window(s) without it. It writes
OUT_DIR/rank{r}.json: one row per case with the relative errors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import tiny_args  # noqa: E402

from longcpt.batch import IGNORE_INDEX, cu_seqlens_for, position_ids  # noqa: E402
from longcpt.model import CausalLM  # noqa: E402
from longcpt.model.attention import kind_spec  # noqa: E402
from longcpt.model.attention.ulysses import SequenceParallel  # noqa: E402
from longcpt.strategies import data_parallel_coordinates, sequence_parallel_group  # noqa: E402

T = 32  # window tokens: 16 per rank with 2 ranks, 8 with 4
# Documents of the two rows of a window; the last one of row 1 is padding (no labels), so ranks
# hold different numbers of labels. Starts 5, 18, 25 / 11, 20 cross the T/2 and T/4 boundaries.
DOCS = [[5, 13, 7, 7], [11, 9, 12]]
PAD_LAST_DOC_OF_ROW = 1


def window(seed: int, kind: str) -> dict[str, torch.Tensor]:
    """A packed (2, T) batch under `kind`'s position rule (the `longcpt.batch` contract)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (len(DOCS), T), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    cu = cu_seqlens_for(DOCS)
    flat_ids, flat_labels = ids.view(-1), labels.view(-1)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        flat_ids[a] = 1  # every document piece starts with BOS
        if i == len(cu) - 2:  # the padding pseudo-document at the end of the last row
            flat_ids[a:b] = 0
            continue
        flat_labels[a : b - 1] = flat_ids[a + 1 : b]
    pos = position_ids(kind_spec(kind).positions, cu, len(DOCS), T)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu}


def build(kind: str, checkpointing: bool) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(tiny_args(attention=kind))  # 4 query heads, 2 KV heads
    model.activation_checkpointing = checkpointing
    return model


def loss_and_grads(model: CausalLM, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch["input_ids"], batch["labels"], batch["position_ids"], batch["cu_seqlens"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def bf16_case(group) -> dict:
    """bf16 autocast (what `trainer.precision=bf16-mixed` runs): the all-to-alls carry bf16 q/k/v."""
    model = build("anchor", False)
    batch = window(100, "anchor")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = loss_and_grads(model, batch)
        model.sequence_parallel = SequenceParallel.of(group)
        loss, _ = loss_and_grads(model, batch)
    return {"kind": "anchor-bf16", "world": dist.get_world_size(), "sp": model.sequence_parallel.size,
            "loss_rel": abs(float(loss / ref) - 1)}


def run_case(kind: str, sp_size: int, checkpointing: bool, group) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = data_parallel_coordinates(rank, world, sp_size)
    model = build(kind, checkpointing)
    batches = [window(100 + i, kind) for i in range(dp_size)]  # one window per data-parallel shard

    # One process: each window alone, gradients averaged over windows.
    ref = [loss_and_grads(model, b) for b in batches]
    ref_loss = ref[dp_rank][0]
    ref_grads = {n: sum(r[1][n] for r in ref) / dp_size for n in ref[0][1]}

    # Sequence parallel: this rank's group shares window dp_rank; gradients averaged over all ranks.
    model.sequence_parallel = SequenceParallel.of(group)
    loss, grads = loss_and_grads(model, batches[dp_rank])
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    grad_rel = max(relative(grads[n], ref_grads[n]) for n in ref_grads)

    # Negative control: the mean of per-rank mean losses (wrong when ranks hold unequal labels).
    sp = model.sequence_parallel
    with torch.no_grad():
        model.sequence_parallel = None
        b = batches[dp_rank]
        hidden = model.hidden_states(b["input_ids"], b["position_ids"], b["cu_seqlens"])
        local = model.lm_head(sp.shard(hidden), sp.shard(b["labels"]))  # this rank's mean
    naive = local.clone()
    dist.all_reduce(naive, group=group)
    naive /= sp.size
    return {"kind": kind, "world": world, "sp": sp_size, "checkpointing": checkpointing,
            "loss": float(loss), "ref_loss": float(ref_loss), "loss_rel": abs(float(loss / ref_loss) - 1),
            "grad_rel": grad_rel, "naive_rel": abs(float(naive / ref_loss) - 1)}


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    groups = {n: sequence_parallel_group(n) for n in (2, 4) if world % n == 0}
    rows = []
    for n, group in groups.items():
        for kind in ("full", "intra_doc", "anchor"):
            rows.append(run_case(kind, n, False, group))
    if 4 in groups:  # activation checkpointing recomputes the all-to-alls in the backward
        rows.append(run_case("anchor", 4, True, groups[4]))
    else:
        rows.append(bf16_case(groups[2]))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
