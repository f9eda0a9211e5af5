"""Logits parity with transformers' own Llama, Mistral and Qwen2 (STYLE item 10)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILIES, ROPE_TYPES, tiny_hf_model
from transformers import AutoModelForCausalLM

import longcpt


def _inputs(t: int = 33, offset: int = 0, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, t), generator=g)
    pos = (torch.arange(t) + offset).expand(batch, t)
    return ids, pos


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_logits_equal_transformers(tmp_path, family, rope):
    hf = tiny_hf_model(family, rope)
    hf.save_pretrained(tmp_path)
    ours = longcpt.from_pretrained(tmp_path, dtype=torch.float32).eval()
    # positions from 0 and beyond 8K (dynamic NTK and YaRN/llama3 ramps all active there)
    for offset in (0, 9000, 40000):
        ids, pos = _inputs(offset=offset)
        with torch.no_grad():
            want = hf(ids, position_ids=pos).logits
            got = ours(ids, position_ids=pos)
        assert (got - want).abs().max().item() <= 1e-5, (family, rope, offset)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_logits_close_to_transformers(tmp_path, family):
    """bf16: the `model` rope path is transformers' arithmetic; `fp32` differs only by rotation rounding.

    Stated tolerance: bf16 keeps 8 bits of mantissa, so logits of magnitude ~3 carry ~0.03 of rounding
    per op; we allow 0.1 absolute for `fp32` rotation and 0.05 for the `model` path.
    """
    hf = tiny_hf_model(family).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ids, pos = _inputs(offset=9000)
    with torch.no_grad():
        want = hf(ids, position_ids=pos).logits.float()
        for precision, tol in (("model", 0.05), ("fp32", 0.1)):
            ours = longcpt.from_pretrained(tmp_path, dtype=torch.bfloat16, rope_precision=precision).eval()
            got = ours(ids, position_ids=pos).float()
            assert got.dtype == torch.float32 and next(ours.parameters()).dtype == torch.bfloat16
            assert (got - want).abs().max().item() <= tol, precision


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_loads_in_plain_transformers(tmp_path, family):
    hf = tiny_hf_model(family, "llama3")
    hf.save_pretrained(tmp_path / "src")
    ours = longcpt.from_pretrained(tmp_path / "src").eval()
    longcpt.save_pretrained(ours, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    ids, pos = _inputs(offset=5000)
    with torch.no_grad():
        assert torch.equal(back(ids, position_ids=pos).logits, ours(ids, position_ids=pos))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [type(hf).__name__]
    # both RoPE styles are written and agree (transformers v4 reads one, v5 the other)
    assert cfg["rope_scaling"]["rope_type"] == cfg["rope_parameters"]["rope_type"] == "llama3"


def test_v4_style_config_is_read(tmp_path):
    """Published checkpoints carry `rope_theta` + `rope_scaling` with the old `type` key."""
    hf = tiny_hf_model("llama", "linear")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params["rope_theta"]
    cfg["rope_scaling"] = {"type": "linear", "factor": params["factor"]}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = longcpt.from_pretrained(tmp_path).eval()
    assert ours.args.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids, pos = _inputs(offset=9000)
    with torch.no_grad():
        assert (ours(ids, position_ids=pos) - hf(ids, position_ids=pos).logits).abs().max() <= 1e-5


def test_rope_theta_override_changes_logits(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    base = longcpt.from_pretrained(tmp_path).eval()
    abf = longcpt.from_pretrained(tmp_path, rope_theta=500000.0).eval()
    assert abf.model.rotary_emb.theta == 500000.0
    ids, pos = _inputs(offset=3000)
    with torch.no_grad():
        assert not torch.allclose(base(ids, position_ids=pos), abf(ids, position_ids=pos))


def test_activation_checkpointing_keeps_gradients(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path)
    ids, _ = _inputs()
    labels = ids.roll(-1, dims=1)
    grads = []
    for ckpt in (False, True):
        model = longcpt.from_pretrained(tmp_path)
        model.activation_checkpointing = ckpt
        model.loss(ids, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
