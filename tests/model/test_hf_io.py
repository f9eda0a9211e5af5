"""Reading every HF weight layout, failing clearly on mismatches, writing atomically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_hf_model

import longcpt
from longcpt.errors import LongcptError
from longcpt.model.hf_io import load_state_dict


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def hf(tmp_path):
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_sharded_safetensors_and_bin_layouts(tmp_path, hf):
    model, path = hf
    ids = torch.randint(0, 128, (1, 20))
    want = _logits(model, ids)
    # sharded safetensors written by transformers itself
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(longcpt.from_pretrained(tmp_path / "sharded"), ids), want)
    # a legacy pytorch_model.bin (loaded with weights_only=True)
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    torch.testing.assert_close(_logits(longcpt.from_pretrained(legacy), ids), want)


def test_our_sharded_export_round_trips(tmp_path, hf):
    _, path = hf
    ours = longcpt.from_pretrained(path)
    longcpt.save_pretrained(ours, tmp_path / "out", max_shard_bytes=50_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = longcpt.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 128, (1, 20))
    assert torch.equal(_logits(back, ids), _logits(ours, ids))


def test_export_dtype_and_files(tmp_path, hf):
    _, path = hf
    longcpt.save_pretrained(longcpt.from_pretrained(path), tmp_path / "out", dtype="bf16")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def test_unknown_and_missing_keys_are_named(tmp_path, hf):
    _, path = hf
    state = load_state_dict(path)
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(LongcptError) as e:
        longcpt.from_pretrained(path)
    assert "model.layers.0.self_attn.extra.weight" in str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value)


def test_unsupported_architecture_and_missing_files(tmp_path, hf):
    _, path = hf
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LongcptError, match="gpt2"):
        longcpt.from_pretrained(path)
    with pytest.raises(LongcptError, match="no config.json"):
        longcpt.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((path / "config.json").read_text().replace("gpt2", "llama"))
    with pytest.raises(LongcptError, match="no weights found"):
        longcpt.from_pretrained(tmp_path / "empty")


def test_failed_export_leaves_previous_folder_intact(tmp_path, hf, monkeypatch):
    _, path = hf
    model = longcpt.from_pretrained(path)
    out = tmp_path / "out"
    longcpt.save_pretrained(model, out)
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("longcpt.export.hf._write_weights", boom)
    with pytest.raises(RuntimeError):
        longcpt.save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, hf):
    from tokenizers import Tokenizer, models

    _, path = hf
    vocab = {f"t{i}": i for i in range(200)}  # 200 tokens > vocab_size 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    with pytest.raises(LongcptError, match="200 tokens"):
        longcpt.save_pretrained(longcpt.from_pretrained(path), tmp_path / "out", tokenizer=tmp_path / "tok")
    assert not (tmp_path / "out").exists()


def test_bf16_cast_keeps_rope_tables_fp32(hf):
    _, path = hf
    model = longcpt.from_pretrained(path, dtype=torch.bfloat16)
    rope = model.model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32
    model.to(torch.float16).to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32
    cos, _ = rope(torch.arange(70000).unsqueeze(0))
    assert cos.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# ZeRO-3 loading (`partitioned=True`, inside deepspeed.zero.Init)


def test_partitioned_loading_skips_the_init_pass_and_loads_exactly(zero_init, hf, monkeypatch):
    """Under zero.Init every `Module.apply` gathers each module on all ranks and broadcasts it back:
    the init pass is a whole-model round trip that the loading then overwrites."""
    import deepspeed

    from longcpt.model.llama import CausalLM

    model, path = hf
    calls = []
    init = CausalLM._init_weights
    monkeypatch.setattr(CausalLM, "_init_weights", lambda self, module: calls.append(module) or init(self, module))
    with zero_init():
        ours = longcpt.from_pretrained(path, partitioned=True)
    assert calls == []
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    params = dict(ours.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            assert torch.equal(p.detach(), want[name]), name
    assert CausalLM(ours.args) is not None and calls  # without weights to load, the init still runs


def test_old_non_zip_bin_is_refused_where_every_rank_would_read_it_whole(tmp_path, hf):
    model, path = hf
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ids = torch.randint(0, 128, (1, 20))
    torch.testing.assert_close(_logits(longcpt.from_pretrained(legacy), ids), _logits(model, ids))  # one process: read
    with pytest.raises(LongcptError, match=r"pytorch_model.bin: an old non-zip PyTorch file .* safetensors"):
        longcpt.from_pretrained(legacy, partitioned=True)


@pytest.mark.slow
def test_a_read_error_on_rank_0_stops_every_rank_with_its_message(tmp_path, hf, forkserver):
    """2 processes: rank 0 fails to read one tensor in the middle of the model; both ranks raise at
    once with rank 0's message (the other rank would otherwise wait in the next gather: with NCCL
    until the collective timeout)."""
    from pathlib import Path

    _, path = hf
    worker = Path(__file__).with_name("zero3_load_worker.py")
    bad = "model.layers.1.mlp.up_proj.weight"
    ranks = forkserver.run_ranks(str(worker), [path, tmp_path, bad], tmp_path / "rank", world=2)
    logs = [child.output() for child in ranks]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(results):
        assert result["raised"] == "LongcptError", (result, logs[r][-3000:])
        assert f"rank 0 could not read {bad} (OSError" in result["message"] and "Input/output error" in result["message"]
    assert results[0]["message"] == results[1]["message"]


@pytest.mark.parametrize("max_pos, scaling, expected", [
    (4096, None, 4096),
    (4096, {"rope_type": "linear", "factor": 4.0}, 16384),  # Vicuna-16K: the pretraining length x 4
    (4096, {"rope_type": "dynamic", "factor": 2.0}, 8192),
    (16384, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, 16384),
    (4096, {"rope_type": "yarn", "factor": 4.0}, 16384),  # original defaults to max_position_embeddings
    (131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}, 131072),  # Llama 3.1 states the extended length
])
def test_context_length_counts_the_rope_scaling(max_pos, scaling, expected):
    from longcpt.model.config import ModelArgs, normalise_rope_scaling

    args = ModelArgs(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, head_dim=8, max_position_embeddings=max_pos,
                     rope_scaling=normalise_rope_scaling(scaling, max_pos, "test") if scaling else None)
    assert args.context_length == expected
