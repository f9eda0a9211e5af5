"""Training-step checks: the real `longcpt train` path on the device, one step per strategy.

Each check trains a tiny Llama (2 layers, 64 wide, GQA) for two optimizer steps through
`longcpt.lit.train.train` on data written to a temporary folder (a prepared data set and a
word-level tokenizer, so the real DataModule runs), on the path the recipe takes (`RecipePath`):
its precision, attention kind and options (the backend), activation checkpointing and RoPE
precision; the step of the recipe's own strategy also gets its ZeRO offload, its sequence
parallelism (N = 2 on 2 devices) and, for ZeRO-3 with `model.pretrained`, a pretrained folder
loaded into the partitions inside `deepspeed.zero.Init`. Its validation set is deliberately
uneven across two ranks (one long and two short documents): every rank must still run the same
number of validation batches, or ZeRO-3 deadlocks.

`StepProbe` records, on every rank:
  * the loss of the first micro-batch on the device, and the loss of that same batch from the
    same starting weights in float32 on the CPU (gathered first under ZeRO-3): this catches a
    crash, a hang or a wrong precision, not a mask (a fully leaking mask moves it by 1.5e-3);
  * the leak probe (`longcpt.doctor.leak`) on the live model before the first step: changing one
    document's tokens must leave every other document's logits as they were (bit-equal on the
    CPU), and changing its first token must move its later tokens (the anchor is visible);
  * the validation batches it ran;
  * for DeepSpeed, the gradient accumulation and communication dtypes the live ZeRO optimizer
    uses (its gradient buffer, not the config it was given).
One device runs in this process; DDP and DeepSpeed run `python -m longcpt.doctor.worker` in
a subprocess that Lightning relaunches once per rank, under a timeout (a hang is a FAIL).

The throughput check then times forward + backward + AdamW of the recipe's model at its
`seq_len` (or of a 4-layer slice of it when the whole model does not fit), and reports tokens/s
and MFU against the GPU's bf16 peak.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcpt.doctor.report import FAIL, PASS, SKIP, Result

SECTION = "training"
VOCAB = 128
STEP_SEQ_LEN = 64
# The device loss of the first micro-batch against the CPU float32 loss of the same batch.
LOSS_TOLERANCE = {"32-true": 1e-3, "bf16-mixed": 2e-2, "bf16-true": 5e-2}
# Validation documents (tokens) written for the step checks: with 2 ranks and 64-token windows,
# rank 0 gets documents 0 and 2 (5 windows), rank 1 gets document 1 (1 window).
UNEVEN_VAL_DOCS = (150, 20, 100)
TIMEOUT_S = {"cpu": 600, "cuda": 900}


# ----------------------------------------------------------------------------------------------
# The scratch run: tokenizer, data, recipe


def write_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer `t3 t4 ...` with <pad>/<s>/</s> (ids 0, 1, 2), as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


def write_dataset(folder: Path, lengths: list[int], seed: int) -> Path:
    """A prepared data set (`prepare_corpus` format: one `input_ids` row per document)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    Dataset.from_dict({"input_ids": docs}).save_to_disk(str(folder))
    return folder


STEP_MODEL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
# Backends that run (with a backward) on the CPU; a recipe's CUDA-only backend runs as `auto` there.
CPU_BACKENDS = ("auto", "sdpa")


@dataclass(frozen=True)
class RecipePath:
    """What the step checks take from the recipe besides its precision and attention kind.

    Attributes:
        options: the attention kind's options (`attention.backend`, ...).
        checkpointing: `trainer.activation_checkpointing`.
        rope_precision: `rope.precision`.
        strategy, stage: `strategy.name` and `strategy.stage`.
        offload_optimizer, offload_parameters: `strategy.offload_*`.
        sequence_parallel: `strategy.sequence_parallel`.
        pretrained: the recipe continues a pretrained model (`model.pretrained`).
    """

    options: dict[str, Any] = field(default_factory=dict)
    checkpointing: bool = False
    rope_precision: str = "fp32"
    strategy: str = "auto"
    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    sequence_parallel: int = 1
    pretrained: bool = False

    @classmethod
    def of(cls, cfg) -> RecipePath:
        """The recipe's path (the defaults without a recipe)."""
        if cfg is None:
            return cls()
        s = cfg.strategy
        return cls(dict(cfg.attention.options), cfg.trainer.activation_checkpointing, cfg.rope.precision, s.name,
                   s.stage, s.offload_optimizer, s.offload_parameters, s.sequence_parallel,
                   cfg.model.pretrained is not None)

    def owns(self, strategy: str, stage: int) -> bool:
        """Whether a step with this strategy (and ZeRO stage) is the recipe's own."""
        return strategy == self.strategy and (strategy != "deepspeed" or stage == self.stage)


def step_plan(path: RecipePath, devices: int, deepspeed: bool) -> tuple[list[tuple[str, int, int]], list[str]]:
    """Which step checks run: (strategy, stage, devices) each, and why others do not.

    One device always runs the recipe's own strategy (a DeepSpeed recipe on one GPU is checked
    under DeepSpeed, with its stage and offload, not as a plain single-device run). With 2 devices,
    DDP, ZeRO-2 and ZeRO-3 each run on 2 processes, the recipe's own one with its sequence
    parallelism. Sequence parallelism needs 2 devices: with fewer, a reason says so.

    Args:
        path: the recipe's path (`RecipePath.of`).
        devices: devices available to the multi-process checks (2 or more, or fewer).
        deepspeed: DeepSpeed is installed.
    """
    single = (path.strategy, path.stage, 1) if path.strategy != "deepspeed" or deepspeed else ("auto", 2, 1)
    runs, skipped = [single], []
    if devices >= 2:
        runs.append(("ddp", 2, 2))
        if deepspeed:
            runs += [("deepspeed", 2, 2), ("deepspeed", 3, 2)]
    if path.sequence_parallel > 1 and devices < 2:
        skipped.append(f"strategy.sequence_parallel={path.sequence_parallel} needs 2 devices to run; "
                       f"{devices} available here")
    return runs, skipped


def step_overrides(root: Path, *, strategy: str, stage: int, devices: int, accelerator: str, precision: str,
                   kind: str, path: RecipePath | None = None) -> tuple[list[str], list[str]]:
    """The recipe of a step check (a `longcpt train` dotlist) over data written under `root`, on
    the recipe's `path`, and what it took from the recipe (for the result line).

    The step of the recipe's own strategy gets its offload, its sequence parallelism (N = 2 on 2
    devices: the tiny model's 4 heads and 2 KV heads allow that much) and, under ZeRO-3 with a
    pretrained model, a pretrained folder, loaded into the partitions as `longcpt train` does.
    """
    path = path or RecipePath()
    tokenizer = root / "tokenizer"
    if not tokenizer.exists():
        write_tokenizer(tokenizer)
        write_dataset(root / "train", [40 + 7 * i for i in range(64)], seed=0)
        write_dataset(root / "val", list(UNEVEN_VAL_DOCS), seed=1)
    own = path.owns(strategy, stage)
    run = f"run-{strategy}{stage if strategy == 'deepspeed' else ''}-{devices}"
    taken = []
    overrides = [
        f"model.tokenizer={tokenizer}", f"attention.kind={kind}",
        f"data.train={root / 'train'}", f"data.val={root / 'val'}", f"data.seq_len={STEP_SEQ_LEN}",
        "data.micro_batch_size=2", "data.num_workers=0", "data.val_batches=2", "optim.lr=1e-3",
        "optim.warmup_steps=1", f"trainer.out_dir={root / run}",
        "trainer.max_steps=2", f"trainer.accelerator={accelerator}", f"trainer.devices={devices}",
        f"trainer.precision={precision}", "trainer.save_every_n_steps=1000", "trainer.val_every_n_steps=1",
        "trainer.log_every_n_steps=1", "trainer.resume=false", f"strategy.name={strategy}",
        f"strategy.stage={stage}", f"trainer.activation_checkpointing={path.checkpointing}",
        f"rope.precision={path.rope_precision}",
    ]
    for name, value in path.options.items():
        if name == "backend" and accelerator == "cpu" and value not in CPU_BACKENDS:
            taken.append(f"backend {value} is CUDA-only: auto here")
            value = "auto"
        elif name == "backend" and value != "auto":
            taken.append(f"backend {value}")
        overrides.append(f"attention.{name}={value}")
    if path.checkpointing:
        taken.append("activation checkpointing")
    if path.rope_precision != "fp32":
        taken.append(f"rope.precision={path.rope_precision}")
    if own and strategy == "deepspeed":
        offload = [name for name, on in (("optimizer", path.offload_optimizer), ("parameters", path.offload_parameters))
                   if on]
        overrides += [f"strategy.offload_optimizer={path.offload_optimizer}",
                      f"strategy.offload_parameters={path.offload_parameters}"]
        taken += [f"offload {' + '.join(offload)}"] if offload else []
    if own and path.sequence_parallel > 1 and devices >= 2:
        overrides.append(f"strategy.sequence_parallel={2}")
        taken.append(f"sequence parallel 2 (the recipe's {path.sequence_parallel})")
    if own and path.pretrained and strategy == "deepspeed" and stage == 3:
        overrides.append(f"model.pretrained={write_pretrained(root / 'pretrained')}")
        taken.append("pretrained weights loaded into ZeRO-3 partitions")
    else:
        overrides.append("model.config={" + ", ".join(f"{k}: {v}" for k, v in STEP_MODEL.items()) + "}")
    return overrides, taken


def write_pretrained(folder: Path) -> Path:
    """The step model with random weights as a Hugging Face folder (safetensors), once."""
    if not (folder / "config.json").exists():
        import longcpt
        from longcpt.model import CausalLM, ModelArgs

        torch.manual_seed(0)
        longcpt.save_pretrained(CausalLM(ModelArgs.from_hf_config({**STEP_MODEL, "vocab_size": VOCAB})), folder)
    return folder


# ----------------------------------------------------------------------------------------------
# What every rank records


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of every parameter and buffer; under ZeRO-3 gathered first (a collective:
    every rank must call this)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # partitioned by DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def reference_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """The loss of `batch` in float32 on the CPU, from `model`'s current weights."""
    import dataclasses

    from longcpt.model import CausalLM

    args = model.args
    options = dict(args.attention_options)
    if "backend" in options:
        options["backend"] = "auto"
    reference = CausalLM(dataclasses.replace(args, attention_options=options))
    reference.load_state_dict(full_weights(model))
    cpu = {k: v.detach().cpu() for k, v in batch.items()}
    with torch.no_grad():
        return float(reference.loss(cpu["input_ids"], cpu["labels"], cpu.get("position_ids"), cpu.get("cu_seqlens")))


def _lightning_callback():
    from lightning.pytorch.callbacks import Callback

    class StepProbe(Callback):
        """Records the first micro-batch's device and CPU float32 losses, validation batches and
        DeepSpeed's data types; each rank writes `rank<N>.json` into `folder` when fit ends."""

        def __init__(self, folder: str | os.PathLike):
            self.folder = Path(folder)
            self.record: dict[str, Any] = {"val_batches": 0}
            self._started = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 0 and batch_idx == 0:
                self.record["reference_loss"] = reference_loss(pl_module.model, batch)
                self.record["tokens"] = int(batch["input_ids"].numel())
                self.record["leak"] = probe_leaks(trainer, pl_module)
            self._started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0 and trainer.global_step <= 1:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.record["loss"] = float(loss)
            self.record.setdefault("step_seconds", []).append(round(time.perf_counter() - self._started, 4))

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.record["val_batches"] += 1

        def on_fit_end(self, trainer, pl_module) -> None:
            engine = getattr(trainer.strategy, "deepspeed_engine", None)
            if engine is not None:
                self.record["deepspeed"] = deepspeed_dtypes(engine)
            self.record.update(rank=trainer.global_rank, world_size=trainer.world_size, global_step=trainer.global_step,
                               device=str(pl_module.device))
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))

    return StepProbe


def probe_leaks(trainer, pl_module) -> dict[str, Any]:
    """The leak probe (`longcpt.doctor.leak`) on the model as this rank trains it: its strategy's
    wrapping, precision context, sequence-parallel group and attention backend. Every rank runs it
    (under ZeRO-3 and sequence parallelism the forward is a collective)."""
    from longcpt.doctor.leak import leak_probe, probe_window, report_data
    from longcpt.model.attention import kind_spec

    model = pl_module.model
    args = model.args
    batch = probe_window(args.attention, args.vocab_size, pl_module.device)
    sp = model.sequence_parallel
    offset = sp.rank * (batch["input_ids"].shape[1] // sp.size) if sp is not None else 0

    def forward(b: dict[str, torch.Tensor]) -> torch.Tensor:
        with trainer.precision_plugin.forward_context():
            return model(b["input_ids"], position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"])

    across = kind_spec(args.attention).hooks.across_documents
    return report_data(leak_probe(forward, batch, args.vocab_size, across, token_offset=offset))


def deepspeed_dtypes(engine) -> dict[str, Any]:
    """The dtypes the live ZeRO optimizer accumulates and reduces gradients in: its gradient buffer
    (ZeRO-3) or the accumulation dtype it was built with (ZeRO-2), not the config it was given."""
    def name(dtype) -> str:
        return str(dtype).replace("torch.", "")

    model_dtype, configured = engine.get_data_types()
    optimizer = engine.optimizer
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    accumulate = buffer.dtype if buffer is not None else getattr(optimizer, "gradient_accumulation_dtype", configured)
    communicate = getattr(optimizer, "communication_data_type", engine.communication_data_type)
    return {"model_dtype": name(model_dtype), "grad_accum_dtype": name(accumulate),
            "communication_data_type": name(communicate), "zero_stage": engine.zero_optimization_stage()}


def run_step(spec: dict[str, Any]) -> None:
    """Train the step check described by `spec` (`overrides`, `result_dir`); every rank runs this."""
    from longcpt.config import load_config
    from longcpt.lit.train import train

    cfg = load_config(None, spec["overrides"], check_paths=True)
    train(cfg, callbacks=[_lightning_callback()(spec["result_dir"])])


# ----------------------------------------------------------------------------------------------
# The verdict


def step_verdict(ranks: list[dict[str, Any]], world: int, precision: str, strategy: str,
                 max_steps: int = 2) -> tuple[str, str]:
    """PASS/FAIL and why, from what every rank recorded (pure: unit-tested)."""
    if len(ranks) != world:
        return (FAIL, f"{len(ranks)} of {world} ranks finished")
    tol = LOSS_TOLERANCE.get(precision, 2e-2)
    problems = []
    worst = 0.0
    for r in ranks:
        if "loss" not in r or "reference_loss" not in r:
            problems.append(f"rank {r.get('rank')} recorded no loss")
            continue
        err = abs(r["loss"] - r["reference_loss"]) / abs(r["reference_loss"])
        worst = max(worst, err) if math.isfinite(err) else float("inf")
        if not err <= tol:
            problems.append(f"rank {r['rank']} loss {r['loss']:.5f} vs CPU float32 {r['reference_loss']:.5f} "
                            f"(rel {err:.1e} > {tol:.0e})")
        if r.get("global_step") != max_steps:
            problems.append(f"rank {r['rank']} stopped at step {r.get('global_step')} of {max_steps}")
    val = sorted({r.get("val_batches") for r in ranks})
    if len(val) > 1:
        problems.append(f"ranks ran different numbers of validation batches {val} (ZeRO-3 would deadlock)")
    ds = [r["deepspeed"] for r in ranks if "deepspeed" in r]
    if strategy == "deepspeed" and ds and ds[0]["model_dtype"] != "float32":
        bad = {k: ds[0][k] for k in ("grad_accum_dtype", "communication_data_type") if ds[0][k] != "float32"}
        if bad:
            problems.append(f"DeepSpeed accumulates/reduces gradients in {bad} under {ds[0]['model_dtype']}: "
                            "set data_types.grad_accum_dtype and communication_data_type to fp32")
    leaks = [r["leak"] for r in ranks if "leak" in r]
    for r in ranks:
        if "leak" in r and not r["leak"]["ok"]:
            problems.insert(0, f"rank {r['rank']} leak probe: " + "; ".join(leak_problems(r["leak"])))
    if problems:
        return (FAIL, "; ".join(problems[:3]))
    line = (f"loss = CPU float32 loss (worst rel {worst:.1e}, tol {tol:.0e}) on {world} rank(s), "
            f"{val[0]} validation batch(es) on every rank")
    if leaks:
        tol_leak = max(lk["tolerance"] for lk in leaks)
        equal = "bit-equal" if tol_leak == 0 else f"within {tol_leak:.1e}"
        line += (f"; leak probe: other documents' logits {equal} when one document changed, its anchor visible "
                 f"({sum(lk['tokens'] for lk in leaks)} tokens)")
    if ds and ds[0]["model_dtype"] != "float32":
        line += f", gradients accumulated and reduced in {ds[0]['grad_accum_dtype']}"
    return (PASS, line)


def leak_problems(leak: dict[str, Any]) -> list[str]:
    """What a rank's leak record (`longcpt.doctor.leak.report_data`) says is wrong."""
    from longcpt.doctor.leak import LeakReport

    return LeakReport(**{k: leak[k] for k in ("stayed", "moved", "anchor_moved", "anchor_stayed", "tolerance",
                                              "tokens")}).problems()


def check_step(strategy: str, stage: int, devices: int, accelerator: str, precision: str, kind: str,
               root: Path, path: RecipePath | None = None) -> Result:
    """Train the step check on `devices` with `strategy` on the recipe's `path`, and judge it
    (`step_verdict`). One device without a strategy runs in this process; the others in a worker."""
    zero = f" ZeRO-{stage}" if strategy == "deepspeed" else ""
    name = "step single device" if devices == 1 else f"step {strategy}{zero} x{devices}"
    overrides, taken = step_overrides(root, strategy=strategy, stage=stage, devices=devices, accelerator=accelerator,
                                      precision=precision, kind=kind, path=path)
    result_dir = root / f"probe-{strategy}{stage}-{devices}"
    spec = {"overrides": overrides, "result_dir": str(result_dir)}
    if devices == 1 and strategy == "auto":
        run_step(spec)
    else:
        failure = _run_worker(spec, root, TIMEOUT_S["cuda" if accelerator == "gpu" else "cpu"])
        if failure:
            return Result(SECTION, name, FAIL, failure)
    ranks = [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank*.json"))]
    status, line = step_verdict(ranks, devices, precision, strategy)
    data = {"ranks": ranks, "precision": precision, "kind": kind, "strategy": f"{strategy}{zero}", "from_recipe": taken}
    what = [precision, kind, *([f"{strategy}{zero}"] if devices == 1 else []), *taken]
    return Result(SECTION, name, status, f"{', '.join(what)}: {line}", data)


def _run_worker(spec: dict[str, Any], root: Path, timeout: float) -> str | None:
    """Run `python -m longcpt.doctor.worker` (Lightning starts the other ranks); None on success,
    else why (the last lines of its output, or the timeout)."""
    spec_file = root / f"spec-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    log = root / f"{spec_file.stem}.log"
    # A local launch: Lightning's own launcher starts the ranks. Inherited SLURM or torchrun
    # variables (the doctor run inside `srun` or a launcher) would make it expect external ones.
    launch = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launch}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "longcpt.doctor.worker", str(spec_file)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline, shown = time.monotonic() + timeout, 0
        while (code := proc.poll()) is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and the ranks it started
                proc.wait()
                return (f"no result after {timeout:.0f} s: a rank is stuck in a collective (a hang); "
                        f"log: {_keep_log(log)}")
            time.sleep(2)
            shown = _show_progress(log, shown)
    if code != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
        return f"exit status {code}: {' | '.join(tail)[-400:]} (log: {_keep_log(log)})"
    return None


def _show_progress(log: Path, shown: int) -> int:
    """Echo the run's step and checkpoint lines (to stderr: the doctor's progress) as they appear."""
    lines = log.read_text(errors="replace").split("\n")[:-1]  # complete lines only
    for line in lines[shown:]:
        if line.startswith(("step ", "checkpoint ")):
            print(f"      {line}", file=sys.stderr, flush=True)
    return len(lines)


def _keep_log(log: Path) -> str:
    """Copy a failed run's log out of the scratch folder, which is deleted at the end."""
    kept = Path(tempfile.gettempdir()) / f"longcpt-doctor-{log.name}"
    shutil.copy(log, kept)
    return str(kept)


# ----------------------------------------------------------------------------------------------
# Throughput of the recipe's model


# Dense bf16 peak FLOP/s by GPU name (vendor data sheets, without sparsity); `--peak-tflops` overrides.
PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70,
                    "A10": 125, "B200": 2250, "GH200": 989}


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return float(PEAK_BF16_TFLOPS[key])
    return None


def step_flops(args, rows: list[list[int]]) -> float:
    """Model FLOPs of one forward + backward of `args`'s model over a batch whose rows hold documents
    of these lengths: the planner's count (`longcpt.plan.compute.batch_flops`: the matmuls, the
    attention pairs of the kind over those documents, and the kind's own terms)."""
    from longcpt.plan.compute import batch_flops
    from longcpt.plan.shape import ModelShape

    return batch_flops(ModelShape.from_args(args), args.attention, args.attention_options, rows)


def parameter_count(args) -> int:
    """Parameters of `args`'s model, a tied embedding once (`longcpt.plan.shape.ModelShape`)."""
    from longcpt.plan.shape import ModelShape

    return ModelShape.from_args(args).parameters


def plan_estimate(cfg, device: torch.device, peak_tflops: float | None) -> dict[str, Any]:
    """`longcpt plan`'s figures for the recipe on this device, to read beside the measured step."""
    from longcpt.plan import estimate

    kwargs: dict[str, Any] = {"suggest": False}
    if device.type == "cuda":
        kwargs["gpu_memory"] = torch.cuda.get_device_properties(device).total_memory
    if peak_tflops:
        kwargs["peak_flops"] = peak_tflops * 1e12
    try:
        plan = estimate(cfg, **kwargs)
    except Exception as e:  # the plan's own problem must not hide the measurement
        return {"error": f"{type(e).__name__}: {e}"}
    # Without this device's peak the plan's step time is an A100's: not comparable with a measurement here.
    timed = device.type == "cuda" or bool(peak_tflops)
    return {"per_gpu_bytes": plan.per_gpu_bytes["total"], "fits": plan.fits,
            "tokens_per_s": plan.step.tokens_per_second if timed else None,
            "step_seconds": plan.step.seconds if timed else None, "mfu": plan.step.mfu}


def _time_steps(model, batch, device, precision: str, steps: int) -> float:
    """Median seconds of forward + backward + AdamW over `steps` steps, after one warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    on = {k: v.to(device) for k, v in batch.items()}
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model.loss(on["input_ids"], on["labels"], on["position_ids"], on["cu_seqlens"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# A model from `model.config` whose tokenizer is not built yet is timed with this vocabulary.
ASSUMED_VOCAB = 32000


def _throughput_args(cfg) -> tuple[Any, Any, str]:
    """The recipe's `ModelArgs` for timing, the recipe they come from, and what had to be assumed
    ("" when nothing): a recipe whose tokenizer does not exist yet (trained by `make demo`, say) is
    timed, and planned, with a vocabulary of `ASSUMED_VOCAB` rather than not at all."""
    import copy

    from longcpt.model.recipe import model_args

    m = cfg.model
    unknown = (m.pretrained is None and "vocab_size" not in m.config
               and not (Path(m.tokenizer or "") / "tokenizer.json").is_file())
    if not unknown:
        return model_args(cfg), cfg, ""
    timed = copy.deepcopy(cfg)
    timed.model.config = {**m.config, "vocab_size": ASSUMED_VOCAB}
    return model_args(timed), timed, f" (vocabulary of {ASSUMED_VOCAB:,} assumed: model.tokenizer={m.tokenizer!r} has no tokenizer.json yet)"


def check_throughput(cfg, device: torch.device, quick: bool, peak: float | None = None,
                     cpu_budget_s: float = 60.0) -> Result:
    """Tokens/s and MFU of the recipe's model at its seq_len (or a 4-layer slice when it does not fit)."""
    import dataclasses

    from longcpt.doctor.kernels import document_lengths, packed_batch
    from longcpt.model import CausalLM

    if cfg is None:
        return Result(SECTION, "throughput", SKIP, "no --recipe: give one to time its model at its seq_len")
    args, cfg, assumed = _throughput_args(cfg)
    n_params = parameter_count(args)
    b, t, precision = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.trainer.precision
    g = torch.Generator().manual_seed(0)
    rows = [document_lengths(t, g) for _ in range(b)]
    what, sliced = "the model", args
    # fp32 weights + gradients + AdamW moments: 16 bytes per parameter before any activation.
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if n_params * 16 > 0.6 * free and args.num_hidden_layers > 4:
            what, sliced = "a 4-layer slice", dataclasses.replace(args, num_hidden_layers=4)
    else:
        seconds = step_flops(args, rows) / 20e9  # about 20 GFLOP/s on one CPU core
        if seconds > cpu_budget_s / (3 if quick else 1):
            return Result(SECTION, "throughput", SKIP, f"{n_params / 1e6:,.0f}M parameters at seq_len {t} would take "
                          f"~{seconds / 60:,.0f} min per step on this CPU: run the doctor on the GPU machine")
    batch = packed_batch(args.attention, rows, args.vocab_size)
    model, timed = None, None
    for attempt in (sliced, dataclasses.replace(args, num_hidden_layers=min(4, args.num_hidden_layers))):
        try:
            torch.manual_seed(0)
            with torch.device(device):  # initialised where it runs: no full float32 copy on the host
                model = CausalLM(attempt)
            if precision == "bf16-true":
                model = model.to(torch.bfloat16)
            model.activation_checkpointing = cfg.trainer.activation_checkpointing
            seconds = _time_steps(model, batch, device, precision, steps=2 if quick else 3)
            timed = attempt
            break
        except torch.cuda.OutOfMemoryError:
            model = None
            torch.cuda.empty_cache()
            if attempt.num_hidden_layers <= 4:
                return Result(SECTION, "throughput", FAIL, f"{what} runs out of GPU memory at seq_len {t} x batch {b}: "
                              "set trainer.activation_checkpointing=true or use more GPUs (ZeRO-3)")
            what = "a 4-layer slice"
    tokens_per_s = b * t / seconds
    flops = step_flops(timed, rows)
    if precision.startswith("bf16"):
        peak = peak or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    else:
        peak = None  # the table holds bf16 peaks
    mfu = flops / seconds / (peak * 1e12) if peak else None
    line = (f"{what} ({parameter_count(timed) / 1e6:,.1f}M params, {precision}){assumed} at seq_len {t} x batch {b}: "
            f"{tokens_per_s:,.0f} tokens/s, {seconds:.3f} s/step")
    line += (f", MFU {mfu:.1%} of {peak:.0f} TFLOP/s" if mfu is not None else
             ", MFU n/a (" + ("no bf16 peak known for this device: --peak-tflops" if precision.startswith("bf16")
                             else f"{precision}: MFU is against the bf16 peak") + ")")
    plan = plan_estimate(cfg, device, peak)
    line += f"; plan: {_plan_line(plan)}"
    data = {"tokens_per_s": tokens_per_s, "step_seconds": seconds, "mfu": mfu, "peak_tflops": peak,
            "model_flops_per_step": flops, "layers": timed.num_hidden_layers, "parameters": n_params,
            "seq_len": t, "micro_batch_size": b, "plan": plan}
    if device.type == "cuda" and not quick:  # on a CPU, benchmarks/train_step.py has the compiled rows
        how = cfg.trainer.compile if cfg.trainer.compile != "none" else "blocks"
        data["compiled"] = compiled_timing(model, batch, device, precision, how, steps=3)
        c = data["compiled"]
        line += (f"; trainer.compile={how}: {b * t / c['step_seconds']:,.0f} tokens/s ({seconds / c['step_seconds']:.2f}x "
                 f"eager), first step {c['first_step_seconds']:.1f} s (compiling)")
    return Result(SECTION, "throughput", PASS, line, data)


def compiled_timing(model, batch, device, precision: str, how: str, steps: int,
                    backend: str = "inductor") -> dict[str, float]:
    """Compile `model` in place (`trainer.compile` = `how`) and time it as `_time_steps` does.

    Returns:
        {"step_seconds": the median compiled step, "first_step_seconds": the first step, which
        compiles (about: the whole timing minus `steps` median steps)}.
    """
    from longcpt.model.compile import compile_model

    compile_model(model, how, backend=backend)
    start = time.perf_counter()
    seconds = _time_steps(model, batch, device, precision, steps)
    first = time.perf_counter() - start - steps * seconds
    return {"step_seconds": seconds, "first_step_seconds": max(first, seconds)}


def _plan_line(plan: dict[str, Any]) -> str:
    if "error" in plan:
        return f"unavailable ({plan['error']})"
    line = f"{plan['per_gpu_bytes'] / 2**30:,.2f} GiB per device"
    if plan["tokens_per_s"] is None:
        return line + " (no step time: --peak-tflops gives this processor's peak)"
    return line + f", {plan['tokens_per_s']:,.0f} tokens/s at an assumed MFU of {plan['mfu']:.0%}"
