"""`longcpt plan` against measured memory of real training steps on CPU processes.

Each case runs `longcpt.lit.train.train` (Lightning, the recipe's strategy: `auto` on one process,
DDP = "ZeRO-0" or DeepSpeed ZeRO-2/3 over gloo on two) on synthetic packed windows, and a callback
measures every rank at one training step after the optimizer state exists (step 3):

  * states: the bytes of every live tensor at the end of that step (unique storages of all the
    tensors Python's garbage collector can reach: parameters, gradients, AdamW's moments,
    DeepSpeed's flat parameter, gradient and master-weight partitions and its buckets), counted by
    allocated size as a GPU allocator would hold them. For reference the RSS growth from just
    before `train()` to the start of the step is reported too (`states_rss`): it also holds about
    30 MiB of process overhead that has nothing to do with the model (oneDNN and SDPA workspaces,
    gloo, autograd threads, the tokenizer);
  * step peak: the peak RSS during the step (Linux's VmHWM, reset with /proc/self/clear_refs at
    the start of the step) minus the RSS at its start: activations and every temporary of the
    forward, backward and optimizer step.

glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so that a freed tensor leaves the resident
set at once; without it freed activations stay in the heap and RSS follows fragmentation, not live
memory. The plan's figures for the same recipe are the terms it says live across steps (weights,
optimizer state, and the gradients and buckets where the strategy keeps them) for the states, and
for the step peak the terms of its largest moment (loss forward, backward or optimizer step) that
exist only during the step: activations, ZeRO-3's gathered parameters and gradients, ZeRO-2's
gradient partition. ZeRO-2's buckets, allocated at each backward, are left out: DeepSpeed
allocates them in full (`reduce_bucket_size`) but on CPU their pages become resident only as
gradients are written into them. Each case is a fresh set of processes.

A case with `lora` (a `model.lora` section as a dict) adapts a pretrained folder of the same model
(random weights, written once per case): only the adapters and the `trainable` modules get
gradients and AdamW moments, and under bf16 the frozen weights are bf16.

Run:  python benchmarks/plan_memory.py                # the grid: tiny, 4-layer x 256 and wide, 256-16K, LoRA
      python benchmarks/plan_memory.py --quick        # tiny model, 2K, one case per strategy
      python benchmarks/plan_memory.py --lora         # the LoRA cases
      python benchmarks/plan_memory.py --case JSON    # one case (what the tests call)
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

MIB = 2**20
MODELS = {
    # The demo recipes' tiny Llama (recipes/tiny_cpu.yaml) with an 8K vocabulary.
    "tiny": "{model_type: llama, vocab_size: 8192, hidden_size: 128, intermediate_size: 352, num_hidden_layers: 4,"
            " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 65536}",
    # The benchmarks' 4-layer x 256 Llama (benchmarks/train_step.py, infini_memory.py).
    "4x256": "{model_type: llama, vocab_size: 8192, hidden_size: 256, intermediate_size: 688, num_hidden_layers: 4,"
             " num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 65536}",
    # Parameters outweigh activations at short windows (as a 7B model's do on a GPU): 68M parameters.
    "wide": "{model_type: llama, vocab_size: 8192, hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 4,"
            " num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 65536}",
}
STRATEGIES = {  # name -> (overrides, devices)
    "single": (["strategy.name=auto"], 1),
    "zero0": (["strategy.name=ddp"], 2),
    "zero2": (["strategy.name=deepspeed", "strategy.stage=2"], 2),
    "zero3": (["strategy.name=deepspeed", "strategy.stage=3"], 2),
}
MEASURED_STEP = 2  # batch index: the third step, after AdamW's moments exist


def case_overrides(case: dict, out_dir: Path, tokenizer: Path) -> list[str]:
    """The recipe (as overrides) of one case (a LoRA case adapts `out_dir.parent / "base"`)."""
    strategy, devices = STRATEGIES[case["strategy"]]
    if "lora" in case:
        lora = ", ".join(f"{k}: {v}" for k, v in case["lora"].items())
        model = [f"model.pretrained={out_dir.parent / 'base'}", f"model.lora={{{lora}}}"]
    else:
        model = [f"model.config={MODELS[case['model']]}"]
    return [
        *model,
        f"model.tokenizer={tokenizer}",
        f"attention.kind={case['kind']}",
        f"data.seq_len={case['seq_len']}",
        f"data.micro_batch_size={case.get('micro_batch', 1)}",
        "data.num_workers=0",
        "optim.warmup_steps=0",
        f"trainer.out_dir={out_dir}",
        f"trainer.max_steps={MEASURED_STEP + 1}",
        "trainer.accelerator=cpu",
        f"trainer.devices={devices}",
        f"trainer.precision={case.get('precision', '32-true')}",
        f"trainer.activation_checkpointing={str(case.get('checkpointing', False)).lower()}",
        "trainer.save_every_n_steps=1000",
        "trainer.val_every_n_steps=1000",
        "trainer.log_every_n_steps=1",
        *strategy,
        *case.get("overrides", []),
    ]


def plan_figures(overrides: list[str]) -> dict:
    """The plan's states and activations (bytes) for a case."""
    from longcpt.config import load_config
    from longcpt.plan import estimate

    plan = estimate(load_config(None, overrides))
    def transient(moment: str) -> int:  # DeepSpeed's buckets ("other") are resident only as written
        return sum(b for category, b in plan.moments[moment].items() if category != "other")

    peak = max(plan.moments, key=transient)
    return {"states": sum(i.bytes for i in plan.items if i.persistent), "activations": transient(peak),
            "weights": plan.per_gpu_bytes["weights"], "peak_at": peak}


# ----------------------------------------------------------------------------------------------
# Worker: one training run, measured by a callback on every rank.


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def live_tensor_bytes() -> int:
    """Bytes of the unique storages behind every tensor the garbage collector can reach."""
    import gc

    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr():
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def run_worker(case: dict, out_dir: Path, tokenizer: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from longcpt.config import load_config
    from longcpt.lit.train import train
    from longcpt.strategies import prepare_environment

    cfg = load_config(None, case_overrides(case, out_dir, tokenizer))
    prepare_environment(cfg, "cpu")
    if cfg.strategy.name == "deepspeed":
        import deepspeed  # noqa: F401  (imported before the baseline, like everything else)
    t, vocab = cfg.data.seq_len, 8192

    class Windows(IterableDataset):
        """Random tokens in documents of random lengths (a few per window), `longcpt.batch` layout."""

        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            while True:
                lengths, left = [], t
                while left > 0:
                    n = min(left, int(torch.randint(max(1, t // 16), max(2, t // 4), (1,), generator=g)))
                    lengths.append(n)
                    left -= n
                ids = torch.randint(3, vocab, (t,), generator=g)
                yield ids, torch.tensor(lengths)

    def collate(rows):
        ids = torch.stack([r[0] for r in rows])
        starts = torch.cat([torch.zeros(1, dtype=torch.long)] + [r[1] for r in rows]).cumsum(0)
        labels = ids.roll(-1, 1)
        labels[:, -1] = -100
        return {"input_ids": ids, "labels": labels, "cu_seqlens": starts.to(torch.int32)}

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(Windows(), batch_size=cfg.data.micro_batch_size, collate_fn=collate)

    class Probe(pl.Callback):
        def __init__(self, baseline: int):
            self.baseline, self.result = baseline, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == MEASURED_STEP:
                self.result["start"] = _status("VmRSS")
                _reset_peak()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == MEASURED_STEP:
                self.result.update(peak=_status("VmHWM"), seconds=time.perf_counter() - self.t0)
                rank = trainer.global_rank
                r = self.result
                out = {"rank": rank, "states": live_tensor_bytes(), "states_rss": r["start"] - self.baseline,
                       "step_peak": r["peak"] - r["start"], "seconds": r["seconds"]}
                (out_dir / f"probe-rank{rank}.json").write_text(json.dumps(out))

    torch.set_num_threads(1)
    baseline = _status("VmRSS")
    train(cfg, datamodule=Data(), callbacks=[Probe(baseline)])


def measure(case: dict, timeout: float = 900) -> dict:
    """Run one case in fresh processes; the plan's figures next to every rank's measurement."""
    with tempfile.TemporaryDirectory(prefix="plan-memory-") as tmp:
        tmp = Path(tmp)
        tokenizer = make_tokenizer(tmp / "tokenizer")
        if "lora" in case:
            make_base(case["model"], tmp / "base")
        env = {**os.environ, "PYTHONPATH": str(SRC), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", json.dumps(case), "--out", str(tmp / "run"),
               "--tokenizer", str(tokenizer)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        ranks = sorted((tmp / "run").glob("probe-rank*.json"))
        if proc.returncode != 0 or not ranks:
            raise RuntimeError(f"case {case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        measured = [json.loads(p.read_text()) for p in ranks]
        plan = plan_figures(case_overrides(case, tmp / "run", tokenizer))
    return {**case, "plan": plan, "ranks": measured, "wall_seconds": round(wall, 1)}


def make_base(model: str, folder: Path) -> Path:
    """A pretrained folder of `MODELS[model]` with random weights (what a LoRA case adapts)."""
    import yaml

    from longcpt.export.hf import save_pretrained
    from longcpt.model import CausalLM, ModelArgs

    return save_pretrained(CausalLM(ModelArgs.from_hf_config(yaml.safe_load(MODELS[model]))), folder)


def make_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer with <pad>/<s>/</s> (the model's vocabulary comes from model.config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


def ratios(result: dict) -> dict:
    """plan / measured, worst rank, for the states and the step peak."""
    plan = result["plan"]
    worst_states = max(result["ranks"], key=lambda r: abs(plan["states"] / r["states"] - 1))
    worst_peak = max(result["ranks"], key=lambda r: abs(plan["activations"] / r["step_peak"] - 1))
    return {"states": plan["states"] / worst_states["states"],
            "activations": plan["activations"] / worst_peak["step_peak"]}


def grid(quick: bool) -> list[dict]:
    """The cases: tiny and 4-layer x 256 at 2K-16K, full and anchor, ZeRO-0/2/3, a few with
    activation checkpointing and bf16 (DeepSpeed's bf16 and autocast on CPU), Infini, and a wide
    model at 256 tokens whose parameters outweigh its activations. A case may add recipe
    `overrides`."""
    quick_cases = [{"model": "tiny", "kind": k, "seq_len": 2048, "strategy": s}
                   for s, k in (("zero0", "anchor"), ("zero2", "full"), ("zero3", "anchor"))]
    if quick:
        return quick_cases
    m = "4x256"
    return quick_cases + [
        {"model": m, "kind": "anchor", "seq_len": 8192, "strategy": "zero0"},
        {"model": m, "kind": "anchor", "seq_len": 8192, "strategy": "zero2"},
        {"model": m, "kind": "anchor", "seq_len": 8192, "strategy": "zero3"},
        {"model": m, "kind": "full", "seq_len": 2048, "strategy": "zero3"},
        {"model": m, "kind": "anchor", "seq_len": 16384, "strategy": "zero3", "checkpointing": True},
        {"model": m, "kind": "anchor", "seq_len": 16384, "strategy": "zero2"},
        {"model": m, "kind": "full", "seq_len": 4096, "strategy": "zero0", "checkpointing": True},
        {"model": m, "kind": "anchor", "seq_len": 4096, "strategy": "zero2", "precision": "bf16-mixed"},
        {"model": m, "kind": "anchor", "seq_len": 8192, "strategy": "zero3", "precision": "bf16-mixed",
         "checkpointing": True},
        {"model": m, "kind": "anchor", "seq_len": 4096, "strategy": "zero0", "precision": "bf16-mixed"},
        {"model": "tiny", "kind": "full", "seq_len": 8192, "strategy": "zero2"},
        {"model": "tiny", "kind": "anchor", "seq_len": 16384, "strategy": "zero0"},
        {"model": "tiny", "kind": "anchor", "seq_len": 16384, "strategy": "zero3", "checkpointing": True},
        {"model": m, "kind": "full", "seq_len": 8192, "strategy": "zero0"},
        {"model": m, "kind": "infini", "seq_len": 8192, "strategy": "zero0"},
        {"model": m, "kind": "infini", "seq_len": 8192, "strategy": "zero0", "checkpointing": True},
        {"model": "tiny", "kind": "full", "seq_len": 2048, "strategy": "zero2", "precision": "bf16-mixed"},
        {"model": "tiny", "kind": "anchor", "seq_len": 2048, "strategy": "zero3", "precision": "bf16-mixed"},
        # the optimizer step is the peak: DeepSpeed's float32 gradient copies show
        {"model": "wide", "kind": "anchor", "seq_len": 256, "strategy": "zero3", "precision": "bf16-mixed"},
        {"model": "wide", "kind": "anchor", "seq_len": 256, "strategy": "zero2", "precision": "bf16-mixed",
         "overrides": ["strategy.deepspeed={zero_optimization: {reduce_bucket_size: 20000000}}"]},
        *LORA_CASES,
    ]


# LoRA as LongLoRA trains (adapters on the attention projections, embeddings and norms in full), and
# adapters alone; the wide model, whose parameters outweigh its activations, shows the states most.
_LONGLORA = {"r": 8, "alpha": 16, "trainable": "[embed_tokens, norm, input_layernorm, post_attention_layernorm]"}
LORA_CASES = [
    {"model": "tiny", "kind": "s2", "seq_len": 2048, "strategy": "zero0", "lora": _LONGLORA},
    {"model": "tiny", "kind": "s2", "seq_len": 2048, "strategy": "zero0", "precision": "bf16-mixed", "lora": _LONGLORA},
    {"model": "wide", "kind": "anchor", "seq_len": 256, "strategy": "zero0", "precision": "bf16-mixed",
     "lora": {"r": 8, "alpha": 16}},
    {"model": "4x256", "kind": "full", "seq_len": 8192, "strategy": "zero0", "lora": _LONGLORA, "checkpointing": True},
    {"model": "wide", "kind": "anchor", "seq_len": 256, "strategy": "zero2", "precision": "bf16-mixed", "lora": _LONGLORA,
     "overrides": ["strategy.deepspeed={zero_optimization: {reduce_bucket_size: 20000000}}"]},
    {"model": "wide", "kind": "anchor", "seq_len": 256, "strategy": "zero3", "precision": "bf16-mixed", "lora": _LONGLORA},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", default=None, help="one case as JSON")
    parser.add_argument("--lora", action="store_true", help="the LoRA cases only")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker), Path(args.out), Path(args.tokenizer))
        return
    cases = [json.loads(args.case)] if args.case else LORA_CASES if args.lora else grid(args.quick)
    load = os.getloadavg()[0]
    print(f"{'model':<6} {'kind':<11} {'tokens':>6} {'strategy':<8} {'precision':<10} {'ckpt':<5} {'states plan/meas MiB':>22} "
          f"{'ratio':>6} {'peak plan/meas MiB':>20} {'ratio':>6}")
    results = []
    for case in cases:
        r = measure(case)
        q = ratios(r)
        meas_states = max(x["states"] for x in r["ranks"])
        meas_peak = max(x["step_peak"] for x in r["ranks"])
        print(f"{r['model']:<6} {r['kind'] + ('+lora' if 'lora' in r else ''):<11} {r['seq_len']:>6} {r['strategy']:<8} {r.get('precision', '32-true'):<10} "
              f"{str(r.get('checkpointing', False)):<5} "
              f"{r['plan']['states'] / MIB:>10.1f} / {meas_states / MIB:>9.1f} {q['states']:>6.3f} "
              f"{r['plan']['activations'] / MIB:>9.1f} / {meas_peak / MIB:>8.1f} {q['activations']:>6.3f}", flush=True)
        results.append({**r, "ratios": q})
    print(json.dumps({"benchmark": "plan_memory", "load_before": load, "results": results}))


if __name__ == "__main__":
    main()
