"""`model_args(cfg)`: the one path from a resolved recipe to the model's constructor arguments.

Train, plan and doctor all build their model from it; it reads only config files, never changes
the recipe, and keeps the runtime choices (attention kind, options, RoPE precision) apart from the
architecture (config.json or `model.config`, plus the `rope:` overrides).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from tiny import word_tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from longcpt.config import load_config
from longcpt.errors import LongcptError
from longcpt.model import from_pretrained
from longcpt.model.recipe import model_args

SCRATCH = ("{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,"
           " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, rope_theta: 10000.0}")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_pretrained_args_are_what_from_pretrained_builds(hf_folder):
    cfg = load_config(None, [f"model.pretrained={hf_folder}", "attention.kind=infini", "attention.segment_len=64",
                             "rope.theta=40000", "rope.scaling={rope_type: dynamic, factor: 2.0}", "rope.precision=model"])
    before = copy.deepcopy(cfg)
    args = model_args(cfg)
    assert cfg == before and model_args(cfg) == args  # pure
    assert (args.attention, args.attention_options, args.rope_precision) == ("infini", cfg.attention.options, "model")
    assert args.rope_theta == 40000.0 and args.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    model = from_pretrained(hf_folder, attention="infini", rope_precision="model", rope_theta=40000,
                            rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **cfg.attention.options)
    assert model.args == args


def test_scratch_args_take_the_tokenizers_vocabulary_with_or_without_loading_it(tmp_path):
    folder = word_tokenizer(tmp_path / "tok", vocab_size=80)
    cfg = load_config(None, [f"model.config={SCRATCH}", f"model.tokenizer={folder}", "rope.theta=20000"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loaded, read = model_args(cfg, tokenizer), model_args(cfg)
    assert loaded.vocab_size == read.vocab_size == 80 and loaded.rope_theta == read.rope_theta == 20000.0
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert dataclasses.replace(loaded, bos_token_id=read.bos_token_id, eos_token_id=read.eos_token_id,
                               pad_token_id=read.pad_token_id, hf_config=read.hf_config) == read


def test_the_runtime_choices_are_kept_apart_from_the_architecture(hf_folder):
    anchor = model_args(load_config(None, [f"model.pretrained={hf_folder}", "attention.kind=anchor"]))
    infini = model_args(load_config(None, [f"model.pretrained={hf_folder}", "attention.kind=infini"]))
    assert anchor.run_as(infini.attention, infini.attention_options, infini.rope_precision) == infini
    assert dataclasses.replace(infini, attention="anchor", attention_options=anchor.attention_options) == anchor


def test_a_recipe_without_vocabulary_is_one_error_naming_the_fix():
    cfg = load_config(None, [f"model.config={SCRATCH}", "model.tokenizer=/no/tokenizer"])
    with pytest.raises(LongcptError, match="model.config has no vocab_size.*model.config.vocab_size=N"):
        model_args(cfg)
