"""LoRA through peft on a `CausalLM`, without a Trainer: what is trained, with every trainable attention
kind and activation checkpointing; the optimizer's groups; merging; the recipe section's checks."""

from __future__ import annotations

import pytest
import torch

from longcpt.config import load_config
from longcpt.errors import ConfigError, LongcptError
from longcpt.lit.optim import build_optimizer
from longcpt.lora.adapters import apply_lora, load_trained, merge, trained_names
from longcpt.lora.config import LoraConfig
from longcpt.model import CausalLM, ModelArgs
from longcpt.model.attention import KINDS

TRAINABLE_KINDS = sorted(name for name, spec in KINDS.items() if spec.trainable)
OPTIONS = {"s2": {"group_size": 8}, "infini": {"segment_len": 16, "gate_lr": 0.05}}
LORA = LoraConfig(r=4, alpha=8.0, trainable=["embed_tokens", "norm", "post_attention_layernorm"])


def tiny(kind: str = "full", seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention=kind,
                              attention_options=OPTIONS.get(kind, {}), max_position_embeddings=256))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 32), generator=g)
    cu = torch.tensor([0, 12, 13, 32, 50, 64], dtype=torch.int32)  # a 1-token document; rows of 32
    return ids, ids.roll(-1, 1), cu


def perturb(model: CausalLM, seed: int = 1) -> None:
    """Random values in every trained tensor (peft starts lora_B at zero: the adapters would be a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def expected_trained(model: CausalLM, lora: LoraConfig) -> set[str]:
    """Written from the section's rule, not from the code: adapters of the targets, the parameters of
    the modules named in `trainable` (by the last component of their name), the kind's own."""
    names = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            assert parts[parts.index("lora_A" if "lora_A" in parts else "lora_B") - 1] in lora.targets
            names.add(name)
        elif parts[-2] in lora.trainable or name.endswith(".core.gate"):
            names.add(name)
    return names


@pytest.mark.parametrize("kind", TRAINABLE_KINDS)
def test_only_adapters_trainable_modules_and_the_kinds_own_parameters_get_gradients(kind):
    model = tiny(kind)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids, labels, cu = batch()
    before = model.loss(ids, labels, cu_seqlens=cu).detach()
    apply_lora(model, LORA)
    assert model.loss(ids, labels, cu_seqlens=cu).detach() == before  # lora_B starts at 0: the base model
    assert set(trained_names(model)) == expected_trained(model, LORA)
    assert any("lora_A" in n for n in trained_names(model)) and "model.norm.weight" in trained_names(model)
    assert "model.layers.0.input_layernorm.weight" not in trained_names(model)  # `norm` is the final norm only
    perturb(model)
    model.loss(ids, labels, cu_seqlens=cu).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trained_names(model))
    for name, p in model.named_parameters():  # frozen: the base weights, untouched
        if not p.requires_grad:
            assert torch.equal(p, base[name.replace("base_layer.", "")]), name


@pytest.mark.parametrize("kind", TRAINABLE_KINDS)
def test_activation_checkpointing_gives_the_same_gradients(kind):
    grads = []
    for checkpointing in (False, True):
        model = tiny(kind)
        apply_lora(model, LORA)
        perturb(model)
        model.activation_checkpointing = checkpointing
        ids, labels, cu = batch()
        model.loss(ids, labels, cu_seqlens=cu).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_optimizer_holds_the_trained_parameters_and_the_kinds_groups():
    from longcpt.lit.optim import param_groups

    model = tiny("infini")
    apply_lora(model, LORA)
    cfg = load_config(None, ["model.config={model_type: llama}", "model.tokenizer=t", "attention.kind=infini"])
    opt, _ = build_optimizer(model, cfg.optim, cfg.trainer.max_steps)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    assert set(groups) == {"decay", "no_decay", "gate"}
    assert groups["gate"]["lr"] == 0.05 and all(n.endswith(".core.gate") for n in groups["gate"]["param_names"])
    assert all("lora_" in n or "embed_tokens" in n for n in groups["decay"]["param_names"])


def test_merged_model_equals_the_adapted_one():
    model = tiny("full")
    tuner = apply_lora(model, LORA)
    perturb(model)
    ids, _, _ = batch()
    with torch.no_grad():
        adapted = model(ids)
        merged = merge(tuner)
        assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids), adapted, rtol=0, atol=1e-5)
    assert set(merged.state_dict()) == set(tiny("full").state_dict())


def test_load_trained_takes_exactly_the_trained_tensors():
    source = tiny("full")
    apply_lora(source, LORA)
    perturb(source)
    state = {n: p.detach().clone() for n, p in source.named_parameters() if p.requires_grad}
    target = tiny("full", seed=0)
    apply_lora(target, LORA)
    load_trained(target, state, "ckpt")
    for name, value in state.items():
        assert torch.equal(dict(target.named_parameters())[name], value)
    with pytest.raises(LongcptError, match="missing.*model.norm.weight"):
        load_trained(target, {k: v for k, v in state.items() if k != "model.norm.weight"}, "ckpt")
    with pytest.raises(LongcptError, match="unexpected.*lm_head.weight"):
        load_trained(target, {**state, "lm_head.weight": torch.zeros(64, 32)}, "ckpt")


def test_unknown_module_names_are_errors_naming_the_model_modules():
    with pytest.raises(LongcptError, match=r"trainable: \['embed'\] name no module.*embed_tokens"):
        apply_lora(tiny(), LoraConfig(trainable=["embed"]))
    with pytest.raises(LongcptError, match="model.lora.targets=.*qproj"):
        apply_lora(tiny(), LoraConfig(targets=["qproj"]))
    with pytest.raises(LongcptError, match="'model.layers.0.self_attn' holds adapted layers"):
        apply_lora(tiny(), LoraConfig(trainable=["self_attn"]))


def test_recipe_section_problems_name_the_keys():
    base = ["model.pretrained=/nowhere", "model.tokenizer=t"]
    cfg = load_config(None, [*base, "model.lora.r=4"])
    assert cfg.model.lora == LoraConfig(r=4) and load_config(None, base).model.lora is None
    assert load_config(None, [*base, "model.lora={}"]).model.lora == LoraConfig()
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, "model.lora.r=0", "model.lora.alpha=-1", "model.lora.dropout=1",
                           "model.lora.targets=[q_proj,lm_head]", "model.lora.trainable=[q_proj]"])
    message = str(err.value)
    for part in ("model.lora.r=0", "model.lora.alpha=-1", "model.lora.dropout=1", "'lm_head' computes the fused loss",
                 "both name ['q_proj']"):
        assert part in message, part
    with pytest.raises(ConfigError, match="did you mean model.lora.alpha"):
        load_config(None, [*base, "model.lora.alpah=4"])
    with pytest.raises(ConfigError, match="model.lora is set but model.pretrained=null"):
        load_config(None, ["model.config={model_type: llama}", "model.tokenizer=t", "model.lora={}"])


def test_adapters_start_from_the_seed_alone_and_leave_torchs_generator_alone():
    """Strategies build the model at different points (ZeRO-3 after DeepSpeed's setup): the adapters
    must not depend on what was drawn before."""
    a, b = tiny(), tiny()
    torch.manual_seed(123)
    apply_lora(a, LORA, seed=5)
    after = torch.rand(1)
    torch.manual_seed(456)
    torch.rand(7)
    apply_lora(b, LORA, seed=5)
    pb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, pb[name]), name
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # apply_lora drew nothing from the global generator
    c = tiny()
    apply_lora(c, LORA, seed=6)
    assert not torch.equal(dict(c.named_parameters())["model.layers.0.self_attn.q_proj.lora_A.default.weight"],
                           pb["model.layers.0.self_attn.q_proj.lora_A.default.weight"])
