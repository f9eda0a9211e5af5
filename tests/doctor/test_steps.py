"""The training-step verdict from what every rank recorded, FLOP counting and the peak table."""

import dataclasses

import pytest
import torch

from longcpt.doctor import steps
from longcpt.doctor.report import FAIL, PASS
from longcpt.model import CausalLM, ModelArgs


def rank(r, loss=2.0, ref=2.0, val=1, step=2, **extra):
    return {"rank": r, "loss": loss, "reference_loss": ref, "val_batches": val, "global_step": step, **extra}


def test_step_verdicts():
    assert steps.step_verdict([rank(0), rank(1)], 2, "bf16-mixed", "ddp")[0] == PASS
    status, why = steps.step_verdict([rank(0), rank(1, loss=2.2)], 2, "bf16-mixed", "ddp")
    assert status == FAIL and "rank 1 loss 2.20000 vs CPU float32 2.00000" in why
    status, why = steps.step_verdict([rank(0, val=2), rank(1, val=1)], 2, "bf16-mixed", "deepspeed")
    assert status == FAIL and "ZeRO-3 would deadlock" in why
    assert steps.step_verdict([rank(0)], 2, "bf16-mixed", "ddp") == (FAIL, "1 of 2 ranks finished")
    assert "stopped at step 1" in steps.step_verdict([rank(0, step=1)], 1, "32-true", "auto")[1]
    assert steps.step_verdict([rank(0, loss=2.001)], 1, "32-true", "auto")[0] == PASS  # 5e-4 < 1e-3


def test_deepspeed_bf16_gradient_accumulation_fails():
    bf16 = {"model_dtype": "bfloat16", "grad_accum_dtype": "bfloat16", "communication_data_type": "bfloat16"}
    status, why = steps.step_verdict([rank(0, deepspeed=bf16)], 1, "bf16-mixed", "deepspeed")
    assert status == FAIL and "grad_accum_dtype" in why
    fp32 = {**bf16, "grad_accum_dtype": "float32", "communication_data_type": "float32"}
    status, why = steps.step_verdict([rank(0, deepspeed=fp32)], 1, "bf16-mixed", "deepspeed")
    assert status == PASS and "accumulated and reduced in float32" in why


def test_step_flops_are_the_planners_count_of_matmuls_and_the_kinds_attention_pairs():
    args = ModelArgs(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention="anchor")
    with torch.device("meta"):
        model = CausalLM(args)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    rows = [[3, 1, 4]]
    pairs = 6 + 1 + 10  # causal inside each document
    assert steps.step_flops(args, rows) == 6 * matmul * 8 + 12 * 2 * 4 * 16 * pairs
    full = dataclasses.replace(args, attention="full")
    assert steps.step_flops(full, rows) == 6 * matmul * 8 + 12 * 2 * 4 * 16 * (8 * 9 // 2)  # across documents
    infini = dataclasses.replace(args, attention="infini", attention_options={"segment_len": 2})
    memory = 2 * 16 * 16 * (4 + 2 * 2) * 8 * 2  # the memory read and write, per token and layer
    assert steps.step_flops(infini, rows) == 6 * matmul * 8 + 12 * 2 * 4 * 16 * ((3 + 1) + 1 + (3 + 3)) + 3 * memory


def test_peak_table():
    assert steps.peak_tflops("NVIDIA H100 PCIe") == 756
    assert steps.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert steps.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert steps.peak_tflops("Tesla T4") is None


def test_plan_estimate_beside_the_measurement(tmp_path):
    """The throughput row quotes `longcpt plan` for the same recipe: its memory always, its step
    time only against this processor's peak (an A100's would not compare with a CPU step)."""
    from longcpt.config import load_config
    from longcpt.plan import estimate

    cfg = load_config("recipes/anchor_llama3_8b_128k.yaml",
                      ["model.pretrained=tests/fixtures/model_configs/Meta-Llama-3-8B"])
    plan = estimate(cfg, suggest=False)
    on_cpu = steps.plan_estimate(cfg, torch.device("cpu"), None)
    assert on_cpu["per_gpu_bytes"] == plan.per_gpu_bytes["total"] and on_cpu["tokens_per_s"] is None
    assert steps._plan_line(on_cpu).startswith(f"{plan.per_gpu_bytes['total'] / 2**30:,.2f} GiB per device (no step")
    with_peak = steps.plan_estimate(cfg, torch.device("cpu"), 312)
    assert with_peak["tokens_per_s"] == plan.step.tokens_per_second  # the plan's default peak is an A100's 312
    # no vocabulary size anywhere: the plan's error in the row, not a crash
    bad = load_config("recipes/tiny_cpu.yaml", [f"model.tokenizer={tmp_path / 'absent'}"])
    assert steps._plan_line(steps.plan_estimate(bad, torch.device("cpu"), None)).startswith("unavailable (")


def test_a_leak_fails_the_step_whatever_the_loss():
    leak = {"stayed": 0.0, "moved": 0.3, "anchor_moved": 0.2, "anchor_stayed": 0.0, "tolerance": 0.0, "tokens": 128,
            "ok": True}
    status, why = steps.step_verdict([rank(0, leak=leak)], 1, "bf16-mixed", "auto")
    assert status == PASS and "bit-equal when one document changed, its anchor visible (128 tokens)" in why
    status, why = steps.step_verdict([rank(0, leak={**leak, "stayed": 0.27, "ok": False})], 1, "bf16-mixed", "auto")
    assert status == FAIL and "leaks across documents" in why
    status, why = steps.step_verdict([rank(0, leak={**leak, "anchor_moved": 0.0, "ok": False})], 1, "32-true", "auto")
    assert status == FAIL and "hides the anchor" in why


def test_the_steps_follow_the_recipes_path(tmp_path):
    from longcpt.config import load_config

    cfg = load_config("recipes/anchor_llama3_8b_128k.yaml",
                      ["model.pretrained=tests/fixtures/model_configs/Meta-Llama-3-8B", "strategy.offload_optimizer=true",
                       "attention.backend=flash_attn", "rope.precision=model"], check_paths=False)
    path = steps.RecipePath.of(cfg)
    assert (path.strategy, path.stage, path.sequence_parallel, path.pretrained) == ("deepspeed", 3, 2, True)
    # One GPU: the single-device step is the recipe's DeepSpeed ZeRO-3, and sequence parallelism is skipped, saying why.
    runs, skipped = steps.step_plan(path, devices=1, deepspeed=True)
    assert runs == [("deepspeed", 3, 1)] and "strategy.sequence_parallel=2 needs 2 devices" in skipped[0]
    runs, skipped = steps.step_plan(path, devices=2, deepspeed=True)
    assert runs == [("deepspeed", 3, 1), ("ddp", 2, 2), ("deepspeed", 2, 2), ("deepspeed", 3, 2)] and not skipped
    assert steps.step_plan(steps.RecipePath(), devices=1, deepspeed=True)[0] == [("auto", 2, 1)]
    own, taken = steps.step_overrides(tmp_path, strategy="deepspeed", stage=3, devices=2, accelerator="gpu",
                                      precision="bf16-mixed", kind="anchor", path=path)
    for key in ("attention.backend=flash_attn", "trainer.activation_checkpointing=True", "rope.precision=model",
                "strategy.offload_optimizer=True", "strategy.sequence_parallel=2",
                f"model.pretrained={tmp_path / 'pretrained'}"):
        assert key in own, key
    assert (tmp_path / "pretrained" / "config.json").is_file() and len(taken) == 6
    other, _ = steps.step_overrides(tmp_path, strategy="deepspeed", stage=2, devices=2, accelerator="cpu",
                                    precision="bf16-mixed", kind="anchor", path=path)
    assert "attention.backend=auto" in other  # flash-attn is CUDA-only
    assert not any(o.startswith(("strategy.sequence_parallel", "model.pretrained", "strategy.offload_optimizer=True"))
                   for o in other)  # not the recipe's own strategy


@pytest.mark.slow
def test_the_single_device_step_fails_a_leaking_mask(tmp_path, monkeypatch):
    """A mask that leaks across documents moves the step's first loss by ~1e-3, inside the loss
    tolerance: the leak probe on the live model fails it."""
    import torch.nn.functional as F

    from longcpt.model.attention import document

    def leaking(q, k, v, cu_seqlens):  # (B, H, T, D): causal over the whole row
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    monkeypatch.setattr(document, "cpu_document_attention", leaking)  # the CPU path of intra_doc and anchor
    result = steps.check_step("auto", 2, 1, "cpu", "bf16-mixed", "anchor", tmp_path)
    assert result.status == FAIL and "leak probe" in result.detail and "leaks across documents" in result.detail
    record = result.data["ranks"][0]
    assert abs(record["loss"] / record["reference_loss"] - 1) < steps.LOSS_TOLERANCE["bf16-mixed"]  # the loss alone passes


def test_compiled_timing_compiles_the_model_and_times_its_steps():
    """The throughput row's compiled figures (on a GPU): the model is compiled in place, each step
    timed as the eager ones; the first step (which compiles) is reported apart."""
    from longcpt.doctor.kernels import packed_batch
    from longcpt.model import CausalLM, ModelArgs

    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention="anchor")
    model = CausalLM(args)
    batch = packed_batch("anchor", [[20, 12], [32]], 64)
    timing = steps.compiled_timing(model, batch, torch.device("cpu"), "32-true", "blocks", steps=2, backend="eager")
    assert 0 < timing["step_seconds"] <= timing["first_step_seconds"]
    assert all(block._compiled_call_impl is not None for block in model.model.layers)  # nn.Module.compile, in place
