"""`longcpt plan` against the measured memory of real training steps: two CPU processes running
`longcpt.lit.train.train` under DDP ("ZeRO-0", float32), DeepSpeed ZeRO-2 and ZeRO-3 (bf16-mixed:
bf16 parameters, float32 gradient partitions and, at stage 3, a float32 bucket), the tiny model, 2K
windows; and LoRA (`model.lora`, LongLoRA's `s2` kind) adapting a pretrained folder of that model
under DDP in float32 and ZeRO-3 in bf16-mixed, where only the adapters, embeddings and norms get
gradients and optimizer state. `benchmarks/plan_memory.py` measures (its docstring says exactly what); it runs the larger
grid (4-layer x 256 model, 2K-16K, checkpointing, bf16) whose figures docs/plan.md records.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "plan_memory.py"
TOLERANCE = 0.15


def _benchmark():
    spec = importlib.util.spec_from_file_location("plan_memory", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# LongLoRA's trained set: adapters on q/k/v/o, the embeddings and every norm in full.
LONGLORA = {"r": 8, "alpha": 16, "trainable": "[embed_tokens, norm, input_layernorm, post_attention_layernorm]"}


@pytest.mark.parametrize("strategy, kind, precision, lora", [
    ("zero0", "anchor", "32-true", None), ("zero2", "full", "bf16-mixed", None), ("zero3", "anchor", "bf16-mixed", None),
    ("zero0", "s2", "32-true", LONGLORA), ("zero3", "s2", "bf16-mixed", {"r": 8, "alpha": 16, "trainable": "[embed_tokens, norm]"}),
], ids=["zero0", "zero2-bf16", "zero3-bf16", "lora-zero0", "lora-zero3-bf16"])
def test_plan_agrees_with_measured_memory_of_a_real_step(strategy, kind, precision, lora):
    bench = _benchmark()
    case = {"model": "tiny", "kind": kind, "seq_len": 2048, "strategy": strategy, "precision": precision}
    result = bench.measure({**case, "lora": lora} if lora else case)
    assert len(result["ranks"]) == 2
    ratios = bench.ratios(result)  # plan / measured, worst rank
    detail = f"plan {result['plan']}, measured {result['ranks']}"
    assert abs(ratios["states"] - 1) <= TOLERANCE, f"model states: {ratios['states']:.3f}; {detail}"
    assert abs(ratios["activations"] - 1) <= TOLERANCE, f"step peak: {ratios['activations']:.3f}; {detail}"
