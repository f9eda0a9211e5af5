"""`longcpt export` of LoRA runs: merged into a plain folder (transformers loads it with the adapted
model's logits), or as a peft adapter folder that `peft.PeftModel.from_pretrained` puts on the base
model with the same logits; only transformers and peft in the loading path of the references.

The runs train with `s2` (LongLoRA's training attention), adapters on the attention projections and
the embeddings and final norm in full; the adapted model is rebuilt for the comparison the way the
paper evaluates it: as `full`, from the base folder plus the checkpoint's unmerged adapters (peft's
own forward, W x + B A x alpha / r).
"""

from __future__ import annotations

import json

import pytest
import torch
from lit_helpers import SyntheticDataModule, tiny_overrides
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import longcpt
from longcpt.cli import main as cli
from longcpt.config import load_config
from longcpt.errors import LongcptError
from longcpt.export.adapter import write_adapter
from longcpt.export.convert import export_checkpoint, read_checkpoint
from longcpt.lit.train import train
from longcpt.lora.adapters import apply_lora, load_trained
from longcpt.lora.config import LoraConfig
from longcpt.model import CausalLM, ModelArgs
from longcpt.model.hf_io import load_pretrained

LORA = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.trainable=[embed_tokens,norm]"]
IDS = torch.randint(3, 96, (2, 32), generator=torch.Generator().manual_seed(5))
TOL = 1e-5


def base_folder(folder):
    """A tiny Llama (tiny_overrides' shape) with random weights, the frozen base of the runs."""
    torch.manual_seed(7)
    args = ModelArgs.from_hf_config({"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "max_position_embeddings": 256})
    return longcpt.save_pretrained(CausalLM(args), folder)


def lora_run(out, tokenizer_dir, base, *extra, kind="s2"):
    """3 steps at a large learning rate, so that the adapters and trained modules move well away from the base."""
    options = ["attention.group_size=8"] if kind == "s2" else []
    overrides = tiny_overrides(out, tokenizer_dir, model__pretrained=str(base), attention__kind=kind,
                               trainer__max_steps=3, optim__lr=3e-2, optim__warmup_steps=0)
    cfg = load_config(None, [*overrides, *LORA, *options, *extra])
    train(cfg, datamodule=SyntheticDataModule(32, 2, restart=True))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("lora_export")
    base = base_folder(root / "base")
    return {"root": root, "base": base, "s2": lora_run(root / "s2", tokenizer_dir, base),
            "theta": lora_run(root / "theta", tokenizer_dir, base, "rope.theta=50000")}


def adapted(run, attention="full"):
    """The adapted model of a run's last checkpoint, unmerged: base folder + peft adapters + trained tensors."""
    state, meta = read_checkpoint(run)
    args = ModelArgs(**meta["model_args"]).run_as(attention, {}, "fp32")
    model = load_pretrained(meta["lora"]["base"], args, dtype="fp32")
    apply_lora(model, LoraConfig(**meta["lora"]["settings"]))
    load_trained(model, state, str(run))
    assert any("lora_B" in n and p.abs().max() > 1e-3 for n, p in model.named_parameters())  # really trained
    return model.eval()


def test_merged_export_loads_in_transformers_with_the_adapted_logits(runs, capsys):
    out = runs["root"] / "merged"
    assert cli(["export", str(runs["s2"]), "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    names = load_file(out / "model.safetensors").keys()
    assert not any("lora" in n or "base_layer" in n for n in names)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours, merged = adapted(runs["s2"])(IDS), exported(IDS).logits
    diff = float((merged - ours).abs().max())
    print(f"merged vs adapted logits: max |diff| = {diff:.2e} (fp32)")
    assert diff <= TOL
    base = AutoModelForCausalLM.from_pretrained(runs["base"]).eval()
    with torch.no_grad():
        assert float((base(IDS).logits - ours).abs().max()) > 1e-2  # the adapters changed the model


def test_adapter_folder_loads_with_peft_on_the_base_with_the_adapted_logits(runs):
    out = runs["root"] / "adapter"
    assert cli(["export", str(runs["s2"]), "--output", str(out), "--adapter-only"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(runs["base"].resolve())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["modules_to_save"]) == ["embed_tokens", "norm"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), out)
    with torch.no_grad():
        diff = float((model.eval()(input_ids=IDS).logits - adapted(runs["s2"])(IDS)).abs().max())
    print(f"peft adapter on the base vs adapted logits: max |diff| = {diff:.2e} (fp32)")
    assert diff <= TOL


def test_a_run_with_its_own_rope_needs_the_base_written_with_it(runs):
    with pytest.raises(LongcptError, match="changed RoPE.*add --base DIR"):
        write_adapter(runs["theta"], runs["root"] / "refused")
    assert not (runs["root"] / "refused").exists()
    out, base = write_adapter(runs["theta"], runs["root"] / "theta_adapter", base_output=runs["root"] / "theta_base")
    assert json.loads((base / "config.json").read_text())["rope_theta"] == 50000
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    with torch.no_grad():
        diff = float((model(input_ids=IDS).logits - adapted(runs["theta"])(IDS)).abs().max())
    assert diff <= TOL


def test_refusals_name_the_fix(runs, tokenizer_dir, tmp_path):
    full = tmp_path / "full"
    overrides = tiny_overrides(full, tokenizer_dir, model__pretrained=str(runs["base"]), trainer__max_steps=1)
    train(load_config(None, overrides), datamodule=SyntheticDataModule(32, 2))
    with pytest.raises(LongcptError, match="needs a LoRA run.*without --adapter-only"):
        write_adapter(full, tmp_path / "a")
    infini = lora_run(tmp_path / "infini", tokenizer_dir, runs["base"], "attention.segment_len=16", kind="infini")
    with pytest.raises(LongcptError, match="'infini' trains parameters of its own.*merged"):
        write_adapter(infini, tmp_path / "b")
    export_checkpoint(infini, tmp_path / "infini_hf")  # merged: gates and all
    assert json.loads((tmp_path / "infini_hf" / "config.json").read_text())["model_type"] != "llama"


def test_a_changed_base_folder_is_refused(runs, tmp_path):
    import shutil

    moved = tmp_path / "base"
    shutil.copytree(runs["base"], moved)
    state, meta = read_checkpoint(runs["s2"])
    other = base_folder(tmp_path / "other_base")  # same shape, other weights
    torch.manual_seed(8)
    longcpt.save_pretrained(CausalLM(ModelArgs(**meta["model_args"]).run_as("full")), other)
    shutil.rmtree(runs["base"])
    shutil.copytree(other, runs["base"])
    try:
        with pytest.raises(LongcptError, match="is not the folder the adapters were trained on"):
            export_checkpoint(runs["s2"], tmp_path / "hf")
    finally:
        shutil.rmtree(runs["base"])
        shutil.copytree(moved, runs["base"])
