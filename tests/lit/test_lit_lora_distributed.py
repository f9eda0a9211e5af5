"""LoRA on two CPU processes (gloo): DDP, DeepSpeed ZeRO-2, ZeRO-3 (loading into partitions, with
activation checkpointing) and sequence parallelism train the adapters and trained modules to the
same values, and their checkpoints export.

All runs adapt the same pretrained folder with `s2` (LongLoRA's training attention) on real
prepared data. References: the DDP run for the data-parallel ones (same windows per rank); for
sequence parallelism, one process reading the same windows (its two ranks form one group).
"""

import pytest
import torch
from lit_helpers import tiny_overrides, train_ok
from transformers import AutoModelForCausalLM

import longcpt
from longcpt.data import load_tokenizer
from longcpt.export.convert import read_checkpoint
from longcpt.model import CausalLM, ModelArgs

pytestmark = pytest.mark.slow

LORA = {"model__lora__r": 4, "model__lora__alpha": 8, "model__lora__trainable": "[embed_tokens,norm]",
        "attention__kind": "s2", "attention__group_size": 16}


def pretrained(folder, tokenizer):
    torch.manual_seed(7)
    args = ModelArgs.from_hf_config({"model_type": "llama", "vocab_size": len(load_tokenizer(str(tokenizer))),
                                     "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256})
    return longcpt.save_pretrained(CausalLM(args), folder)


def launch(forkserver, out, corpus, model, devices, **extra):
    args = tiny_overrides(out, None, corpus, model__pretrained=str(model), trainer__devices=devices,
                          trainer__max_steps=4, optim__min_lr_ratio=1.0, **LORA, **extra)
    return train_ok(forkserver, args, out.with_name(f"{out.name}-rank"), world=devices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, forkserver):
    root = tmp_path_factory.mktemp("lora_dist")
    model = pretrained(root / "pretrained", corpus["tokenizer"])
    launch(forkserver, root / "one", corpus, model, 1)
    launch(forkserver, root / "sp", corpus, model, 2, strategy__name="ddp", strategy__sequence_parallel=2)
    launch(forkserver, root / "ddp", corpus, model, 2, strategy__name="ddp")
    launch(forkserver, root / "zero2", corpus, model, 2, strategy__name="deepspeed", strategy__stage=2)
    launch(forkserver, root / "zero3", corpus, model, 2, strategy__name="deepspeed", strategy__stage=3,
           trainer__activation_checkpointing="true", trainer__export_hf="true")
    return root


@pytest.mark.parametrize("name, reference", [("sp", "one"), ("zero2", "ddp"), ("zero3", "ddp")])
def test_trained_tensors_equal_the_reference(runs, name, reference):
    ref, _ = read_checkpoint(runs / reference)
    got, meta = read_checkpoint(runs / name)
    assert meta["lora"]["settings"]["r"] == 4
    assert ref.keys() == got.keys() and any("lora_B" in k for k in ref)
    assert not any("base_layer" in k or "mlp" in k for k in got)  # only what was trained
    # Four AdamW steps at lr 3e-3 move the tensors by about 1e-2; summation order leaves float32
    # noise of about 1e-6. A wrong update, window or frozen weight would differ by ~1e-3.
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-5, msg=k)
    assert all(float(ref[k].abs().max()) > 1e-3 for k in ref if "lora_B" in k)  # trained away from zero


def test_zero3_export_merges_to_the_ddp_weights(runs):
    from longcpt.export.convert import load_model

    reference, _ = load_model(runs / "ddp", for_inference=True)
    exported = AutoModelForCausalLM.from_pretrained(runs / "zero3" / "hf").eval()
    ids = torch.randint(3, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids), rtol=1e-4, atol=1e-4)
