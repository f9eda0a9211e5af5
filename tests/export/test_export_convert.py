"""`longcpt export`: Lightning checkpoint -> HF folder that plain transformers loads with the same logits."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lit_helpers import SyntheticDataModule, tiny_overrides
from safetensors import safe_open
from tiny import word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from longcpt.config import load_config
from longcpt.errors import LongcptError
from longcpt.export.convert import export_checkpoint, resolve_checkpoint
from longcpt.lit.train import train


class KeepFinalModel(pl.Callback):
    """Copies the live model at the end of training: the reference the export must reproduce."""

    def on_train_end(self, trainer, pl_module):
        self.model = pl_module.model
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A 4-step run (tied embeddings) exported at the end (trainer.export_hf=true)."""
    out = tmp_path_factory.mktemp("export") / "run"
    overrides = tiny_overrides(out, tokenizer_dir, trainer__max_steps=4, trainer__export_hf="true")
    overrides = [o.replace("max_position_embeddings: 256", "max_position_embeddings: 256, tie_word_embeddings: true")
                 for o in overrides]
    keep = KeepFinalModel()
    result = train(load_config(None, overrides), datamodule=SyntheticDataModule(32, 2), callbacks=[keep])
    return result, keep


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(ids).logits


def trained_logits(keep: KeepFinalModel, ids: torch.Tensor) -> torch.Tensor:
    keep.model.load_state_dict(keep.state)
    with torch.no_grad():
        return keep.model.eval()(ids)


def test_end_of_training_export_matches_trained_model(trained):
    result, keep = trained
    assert result.hf_dir == result.out_dir / "hf"
    config = json.loads((result.hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 96 and config["torch_dtype"] == "float32"
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf_logits(result.hf_dir, ids), trained_logits(keep, ids), rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(result.hf_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 0, 96)


def test_export_bf16_from_the_run_folder(trained, tmp_path):
    result, keep = trained
    out = export_checkpoint(result.out_dir, tmp_path / "bf16", dtype="bf16")
    with safe_open(out / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.embed_tokens.weight")
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w, keep.state["model.embed_tokens.weight"].bfloat16(), rtol=0, atol=0)


def test_resolve_checkpoint_forms(trained):
    result, _ = trained
    ckpt = (result.out_dir / "checkpoints" / "step-00000004.ckpt").resolve()
    for form in (result.out_dir, result.out_dir / "checkpoints", result.out_dir / "checkpoints" / "last", ckpt):
        assert resolve_checkpoint(form) == ckpt
    with pytest.raises(LongcptError, match="does not exist"):
        resolve_checkpoint(result.out_dir / "nope.ckpt")
    with pytest.raises(LongcptError, match="not a DeepSpeed checkpoint"):
        resolve_checkpoint(result.out_dir / "tokenizer")


def test_tokenizer_larger_than_the_model_is_refused(trained, tmp_path):
    from tokenizers import Tokenizer

    result, _ = trained
    big = word_tokenizer(tmp_path / "big")
    tok = Tokenizer.from_file(str(big / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(10)])  # 106 tokens > 96 embeddings
    tok.save(str(big / "tokenizer.json"))
    with pytest.raises(LongcptError, match="tokenizer has 106 tokens but the model's vocab_size is 96"):
        export_checkpoint(result.out_dir, tmp_path / "hf", tokenizer=big)
    assert not (tmp_path / "hf").exists()


def test_cli_export_and_its_errors(trained, tmp_path, run_script):
    result, keep = trained
    ckpt = result.out_dir / "checkpoints" / "last"
    ok = run_script("-m", "longcpt", "export", ckpt, "--output", tmp_path / "hf")
    assert ok.returncode == 0, ok.stderr[-2000:]
    ids = torch.arange(3, 40).view(1, -1)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), trained_logits(keep, ids), rtol=1e-5, atol=1e-5)

    bad = run_script("-m", "longcpt", "export", tmp_path / "missing.ckpt", "--output", tmp_path / "x")
    assert bad.returncode == 2 and "missing.ckpt does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()


def test_infini_checkpoint_exports_through_the_same_path(tmp_path, tokenizer_dir):
    """No special case for Infini in export: the folder carries its own modeling code."""
    from longcpt.model.attention import KINDS

    if "infini" not in KINDS:
        pytest.skip("Infini-attention is not in this build")
    overrides = tiny_overrides(tmp_path / "run", tokenizer_dir, trainer__max_steps=2, attention__kind="infini",
                               attention__segment_len=8)
    keep = KeepFinalModel()
    result = train(load_config(None, overrides), datamodule=SyntheticDataModule(32, 2, restart=True),
                   callbacks=[keep])
    out = export_checkpoint(result.out_dir, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] != "llama"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(2))  # three segments
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained_logits(keep, ids), rtol=1e-5, atol=1e-5)


def test_evaluation_accepts_the_training_checkpoint(trained):
    """`--model RUN_DIR` (no export): same logits as the export; anchor/intra_doc run as full."""
    from longcpt.eval.loading import load_model_and_tokenizer

    result, _ = trained
    model, tokenizer = load_model_and_tokenizer(result.out_dir)
    assert model.args.attention in ("full", "infini")
    assert tokenizer.vocab_size <= model.args.vocab_size
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(result.hf_dir, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(LongcptError, match="does not exist"):
        load_model_and_tokenizer(result.out_dir / "nowhere")


def test_infllm_applies_to_a_training_checkpoint(trained):
    """An inference-time memory on a checkpoint: within its window `infllm` equals the trained model."""
    from longcpt.export.convert import load_model

    result, keep = trained
    options = {"n_init": 4, "n_local": 32, "block_size": 8, "topk": 2, "repr_topk": 2, "exc_block_size": 16,
               "max_cached_block": 2, "repr_dtype": "float32"}
    model, _ = load_model(result.out_dir, for_inference=True, attention="infllm", attention_options=options)
    assert model.args.attention == "infllm" and model.args.attention_options == options
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), trained_logits(keep, ids), rtol=1e-5, atol=1e-5)
        assert model(torch.randint(0, 96, (2, 100))).isfinite().all()  # beyond the window: blocks retrieved
