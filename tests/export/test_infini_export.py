"""Infini export: a folder that plain transformers loads with `trust_remote_code=True` in a
process where longcpt cannot be imported, giving our logits and our greedy continuation over
several segments; and longcpt reads it back."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from longcpt.export.hf import save_pretrained
from longcpt.model import CausalLM, ModelArgs, from_pretrained
from longcpt.model.attention.infini import InfiniAttention
from longcpt.model.attention.infini import export as infini_hf
from longcpt.model.attention.infini.hf_config import AUTO_MAP

VOCAB = 61
SEGMENT = 8
FAMILIES = {
    # Tied embeddings, Llama 3 RoPE scaling, linear memory update.
    "llama": dict(model_type="llama", tie_word_embeddings=True, memory_update="linear",
                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 4}),
    # q/k/v biases, YaRN, delta rule.
    "qwen2": dict(model_type="qwen2", qkv_bias=True, memory_update="delta",
                  rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}),
    "mistral": dict(model_type="mistral", memory_update="delta", rope_scaling=None),
}


def infini_model(family: str, seed: int = 0) -> CausalLM:
    spec = dict(FAMILIES[family])
    memory_update = spec.pop("memory_update")
    torch.manual_seed(seed)
    args = ModelArgs(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention="infini",
        attention_options={"segment_len": SEGMENT, "memory_update": memory_update}, **spec,
    )
    model = CausalLM(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith(".core.gate") or "norm" in name:
                p.uniform_(-1.0, 1.0)  # non-trivial biases, gates and norms
    return model.eval()


def greedy_streaming(model: CausalLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation with the streaming path: prompt in one call, then one token a call."""
    state: dict = {}
    b, t = ids.shape
    with torch.no_grad():
        logits = model(ids, position_ids=torch.arange(t).expand(b, t), state=state)
        out = []
        for i in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(token)
            logits = model(token, position_ids=torch.full((b, 1), t + i), state=state)
    return torch.cat([ids, *out], dim=1)


PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import json, sys
    sys.modules["longcpt"] = None  # the exported folder must work without longcpt
    import torch
    from transformers import AutoModelForCausalLM

    root = sys.argv[1]
    for family in json.loads(sys.argv[2]):
        model = AutoModelForCausalLM.from_pretrained(f"{root}/{family}", trust_remote_code=True).eval()
        ids = torch.load(f"{root}/ids.pt")
        with torch.no_grad():
            logits = model(ids).logits
            # Streaming: the same sequences in chunks of 5, 11 and the rest, one state carried along.
            state, chunked = None, []
            for lo, hi in ((0, 5), (5, 16), (16, ids.shape[1])):
                out = model(ids[:, lo:hi], infini_state=state, use_cache=True)
                state = out.infini_state
                chunked.append(out.logits)
        model.generation_config.eos_token_id = None  # compare 5 tokens, whatever they are
        calls = []  # tokens per forward: the cache means the prompt once, then one token a step
        hook = model.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)
        hook.remove()
        uncached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                  pad_token_id=0, use_cache=False)
        torch.save({"logits": logits, "chunked": torch.cat(chunked, dim=1), "generated": generated,
                    "uncached": uncached, "calls": calls, "class": type(model).__name__},
                   f"{root}/{family}.out.pt")
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every family exported, our logits and greedy continuations, and what plain transformers
    (one subprocess, longcpt blocked, our src not on the path) computes from the folders."""
    root = tmp_path_factory.mktemp("infini_export")
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT + 5), generator=torch.Generator().manual_seed(0))  # 3.6 segments
    torch.save(ids, root / "ids.pt")
    ours = {}
    for family in FAMILIES:
        model = infini_model(family)
        save_pretrained(model, root / family)
        with torch.no_grad():
            ours[family] = {"logits": model(ids), "generated": greedy_streaming(model, ids, 5), "model": model}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(root), json.dumps(list(FAMILIES))],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    theirs = {family: torch.load(root / f"{family}.out.pt") for family in FAMILIES}
    return root, ids, ours, theirs


@pytest.mark.subprocess
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_transformers_gives_our_logits_over_several_segments(exported, family):
    _, _, ours, theirs = exported
    assert theirs[family]["class"] == "LongcptInfiniForCausalLM"
    torch.testing.assert_close(theirs[family]["logits"], ours[family]["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.subprocess
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_transformers_generate_equals_our_streaming_greedy(exported, family):
    _, ids, ours, theirs = exported
    assert torch.equal(theirs[family]["generated"], ours[family]["generated"])
    # generate streams through its state: the prompt once, then one token per step ...
    assert theirs[family]["calls"] == [ids.shape[1]] + [1] * 4
    # ... and answers as re-reading the whole sequence at every step does.
    assert torch.equal(theirs[family]["uncached"], theirs[family]["generated"])


@pytest.mark.subprocess
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_transformers_streams_in_any_chunks(exported, family):
    _, _, ours, theirs = exported
    torch.testing.assert_close(theirs[family]["chunked"], ours[family]["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.subprocess
def test_folder_layout_and_config(exported):
    root, _, ours, _ = exported
    folder = root / "qwen2"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", *infini_hf.REMOTE_FILES} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "longcpt_infini"
    assert config["architectures"] == ["LongcptInfiniForCausalLM"]
    assert config["auto_map"] == AUTO_MAP
    assert config["infini_base_model_type"] == "qwen2" and config["infini_qkv_bias"] is True
    assert config["infini_segment_len"] == SEGMENT and config["infini_memory_update"] == "delta"
    assert config["longcpt_rope"]["rope_type"] == "yarn"
    assert not {"rope_theta", "rope_scaling", "rope_parameters"} & config.keys()
    weights = load_file(folder / "model.safetensors")
    gate = ours["qwen2"]["model"].model.layers[1].self_attn.core.gate.detach()
    assert torch.equal(weights["model.layers.1.self_attn.core.gate"], gate)


def test_shipped_files_import_only_torch_and_transformers():
    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)  # nothing else from outside
    for name in infini_hf.REMOTE_FILES:
        tree = ast.parse((infini_hf.REMOTE_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the sibling configuration file
                    assert node.module == "configuration_longcpt_infini", name
                else:
                    assert node.module.split(".")[0] in allowed, (name, node.module)


@pytest.mark.subprocess
@pytest.mark.parametrize("family", list(FAMILIES))
def test_longcpt_reads_the_export_back(exported, family, tmp_path):
    root, ids, ours, _ = exported
    model = from_pretrained(root / family).eval()
    assert model.args.attention == "infini" and model.args.model_type == family
    assert model.args.attention_options["segment_len"] == SEGMENT
    assert model.args.rope_scaling == ours[family]["model"].args.rope_scaling
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ours[family]["logits"], rtol=0, atol=0)
    save_pretrained(model, tmp_path / "again")  # re-export: the same folder
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again == json.loads((root / family / "config.json").read_text())
    # Loading as another kind drops the gates (an ablation without memory).
    full = from_pretrained(root / family, attention="full")
    assert not [n for n, _ in full.named_parameters() if ".core." in n]


def test_plain_llama_continued_with_infini_exports_fresh_gates(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    model = from_pretrained(tmp_path / "llama", attention="infini", segment_len=16, gate_init=-3.0)
    assert all(torch.equal(m.gate.detach(), torch.full((4,), -3.0)) for m in model.modules() if isinstance(m, InfiniAttention))
    save_pretrained(model, tmp_path / "infini", dtype="bf16")
    config = json.loads((tmp_path / "infini" / "config.json").read_text())
    assert config["model_type"] == "longcpt_infini" and config["infini_gate_init"] == -3.0
    assert config["dtype"] == "bfloat16"
    back = from_pretrained(tmp_path / "infini")
    assert next(back.parameters()).dtype == torch.bfloat16
    assert back.args.attention_options == {"segment_len": 16, "memory_update": "delta", "bptt_segments": 2,
                                           "gate_init": -3.0, "gate_lr": 0.01}  # gate_lr: training only, not exported


@pytest.mark.subprocess
def test_evaluation_loads_an_infini_export_without_asking_to_run_its_code(exported, tokenizer_dir, tmp_path,
                                                                           monkeypatch):
    """transformers asks "Do you wish to run the custom code? [y/N]" when a folder with an auto_map
    is loaded without trust_remote_code: `longcpt eval` must neither ask nor run it."""
    import builtins
    import shutil

    from longcpt.eval.loading import load_model_and_tokenizer

    root, ids, ours, _ = exported
    folder = tmp_path / "infini"
    shutil.copytree(root / "mistral", folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)

    asked = []
    monkeypatch.setattr(builtins, "input", lambda *args: asked.append(args) or "n")
    model, tok = load_model_and_tokenizer(folder)
    assert asked == []
    assert tok.bos_token == "<s>" and model.args.attention == "infini"
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ours["mistral"]["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", ["default", "linear", "dynamic", "yarn", "llama3"])
@pytest.mark.parametrize("seq_len", [64, 512])  # within and beyond max_position_embeddings (dynamic NTK)
def test_shipped_rope_equals_ours_for_every_scaling_type(rope, seq_len):
    from tiny import ROPE_TYPES

    from longcpt.model.attention.infini.remote import modeling_longcpt_infini as shipped
    from longcpt.model.rope import rope_frequencies

    scaling = ROPE_TYPES[rope]
    ours = rope_frequencies(32, 10000.0, scaling, 128, seq_len)
    theirs = shipped.rope_frequencies(32, {"rope_theta": 10000.0, **(scaling or {})}, 128, seq_len)
    assert torch.equal(theirs[0], ours[0]) and theirs[1] == ours[1]
    plain = rope_frequencies(32, 10000.0, None, 128)[0]
    if rope != "default" and not (rope == "dynamic" and seq_len <= 128):  # not vacuous: scaling changes them
        assert not torch.equal(ours[0], plain)


def test_shipped_config_defaults_are_the_kinds_defaults():
    from longcpt.model.attention.infini import OPTIONS
    from longcpt.model.attention.infini.remote.configuration_longcpt_infini import LongcptInfiniConfig

    config = LongcptInfiniConfig()
    assert {name: getattr(config, f"infini_{name}") for name in OPTIONS} == {k: o.default for k, o in OPTIONS.items()}
