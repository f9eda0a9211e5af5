"""Optimizer groups and the learning-rate schedule (no Trainer needed)."""

import math

import pytest
import torch
from tiny import tiny_args
from torch import nn

from longcpt.config import OptimConfig
from longcpt.lit.optim import build_optimizer, lr_factor, param_groups
from longcpt.model.llama import CausalLM


def tiny_model(**kw) -> CausalLM:
    return CausalLM(tiny_args(qkv_bias=True, o_bias=True, **kw))  # biases: the no-decay group is not only norms


def test_groups_split_matrices_vectors_and_gates():
    model = tiny_model(attention="infini", attention_options={"gate_lr": 1e-2})  # the kind's param_groups hook
    optim = OptimConfig(lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(model, optim)}

    assert set(groups) == {"decay", "no_decay", "gate"}
    assert groups["gate"]["param_names"] == [f"model.layers.{i}.self_attn.core.gate" for i in range(2)]
    assert (groups["gate"]["lr"], groups["gate"]["weight_decay"]) == (1e-2, 0.0)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    no_decay = set(groups["no_decay"]["param_names"])
    assert "model.norm.weight" in no_decay and "model.layers.1.input_layernorm.weight" in no_decay
    assert "model.layers.0.self_attn.q_proj.bias" in no_decay
    decay = set(groups["decay"]["param_names"])
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"} <= decay
    # Every trainable parameter is in exactly one group.
    names = [n for g in groups.values() for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_a_kind_without_the_hook_gets_no_group_of_its_own(monkeypatch):
    """The groups come from the kind's hook, not from parameter names: a core parameter of a kind
    without `param_groups` is an ordinary vector (no decay)."""
    import dataclasses

    from longcpt.model.attention import KINDS, KindHooks, ParamGroup

    model = tiny_model()
    model.model.layers[0].self_attn.core.scale = nn.Parameter(torch.zeros(4))
    groups = {g["name"]: g for g in param_groups(model, OptimConfig())}
    assert set(groups) == {"decay", "no_decay"} and "model.layers.0.self_attn.core.scale" in groups["no_decay"]["param_names"]

    def own(options, optim):
        return [ParamGroup("scale", ("scale",), 0.5, 0.25)]

    monkeypatch.setitem(KINDS, "full", dataclasses.replace(KINDS["full"], hooks=KindHooks(param_groups=own)))
    groups = {g["name"]: g for g in param_groups(model, OptimConfig())}
    assert groups["scale"]["param_names"] == ["model.layers.0.self_attn.core.scale"]
    assert (groups["scale"]["lr"], groups["scale"]["weight_decay"]) == (0.5, 0.25)


def test_tied_embedding_appears_once():
    model = tiny_model(tie_word_embeddings=True)
    groups = param_groups(model, OptimConfig())
    params = [id(p) for g in groups for p in g["params"]]
    assert len(params) == len(set(params)) == len(list(model.parameters()))


@pytest.mark.parametrize("warmup,total,ratio", [(5, 40, 0.1), (1, 10, 0.0), (10, 11, 0.5)])
def test_schedule_matches_torch_linear_then_cosine(warmup, total, ratio):
    """Reference: torch's LinearLR warmup followed by CosineAnnealingLR down to lr * ratio."""
    lr = 0.3
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1))
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=lr * ratio)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[warmup])
    for step in range(total):
        assert lr * lr_factor(step, warmup, total, ratio) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), step
        opt.step()
        ref.step()
    assert lr_factor(total + 5, warmup, total, ratio) == pytest.approx(ratio)


def test_no_warmup_starts_at_peak():
    assert lr_factor(0, 0, 100, 0.1) == 1.0
    assert lr_factor(50, 0, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_build_optimizer_applies_schedule_per_group():
    model = tiny_model(attention="infini", attention_options={"gate_lr": 1e-2})
    optim = OptimConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    opt, sched = build_optimizer(model, optim, max_steps=20)
    assert isinstance(opt, torch.optim.AdamW)
    for _ in range(4):
        opt.step()
        sched.step()
    by_name = {g["name"]: g["lr"] for g in opt.param_groups}
    assert by_name["decay"] == pytest.approx(1e-3) and by_name["gate"] == pytest.approx(1e-2)


def test_infini_gates_get_their_own_group():
    from longcpt.model.attention import KINDS

    if "infini" not in KINDS:
        pytest.skip("Infini-attention is not in this build")
    model = CausalLM(tiny_model().args.run_as("infini", {"gate_lr": 5e-3}))
    gate = {g["name"]: g for g in param_groups(model, OptimConfig())}["gate"]
    assert gate["param_names"] == [f"model.layers.{i}.self_attn.core.gate" for i in range(2)]
    assert (gate["lr"], gate["weight_decay"]) == (5e-3, 0.0)
