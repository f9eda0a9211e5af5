"""Recipe loading: every problem reported at once, with key, value and fix."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest

from longcpt.config import Config, load_config, resolve, save_config, validate
from longcpt.errors import ConfigError, DeprecatedKeyWarning, LongcptError


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "model:\n  config: {model_type: llama, hidden_size: 64}\n  tokenizer: tok\n"


def test_overrides_beat_recipe_beat_defaults(tmp_path):
    path = _recipe(tmp_path, BASE + "trainer:\n  max_steps: 7\n  seed: 3\n")
    cfg = load_config(path, ["trainer.max_steps=9", "optim.betas=[0.8,0.9]", "strategy.deepspeed.foo=1"])
    assert isinstance(cfg, Config)
    assert (cfg.trainer.max_steps, cfg.trainer.seed, cfg.optim.betas) == (9, 3, [0.8, 0.9])
    assert cfg.data.seq_len == 4096  # schema default
    assert cfg.strategy.deepspeed == {"foo": 1}  # free-form dicts pass through
    assert cfg.model.config == {"model_type": "llama", "hidden_size": 64}


def test_every_problem_is_listed_with_a_fix(tmp_path):
    path = _recipe(tmp_path, BASE + "traner:\n  max_steps: 3\ndata:\n  seq_len: many\n  pakcing: bfd\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["optim.lr=-1", "attention.kind=ancor", "nonsense"])
    msg = str(e.value)
    assert len(e.value.problems) == 6, msg
    assert "did you mean trainer?" in msg
    assert "did you mean data.packing?" in msg
    assert "data.seq_len='many'" in msg and "expected int" in msg
    assert "optim.lr=-1.0: must be > 0" in msg
    assert "attention.kind='ancor'" in msg and "did you mean anchor?" in msg
    assert "'nonsense': expected key=value" in msg


def test_an_override_that_is_not_yaml_is_named_with_the_others():
    """A bracket left open (or split by an unquoted shell word) is one listed problem, not a parser traceback."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.tokenizer=tok", "model.config={model_type: llama", "trainer.max_steps=[1", "optim.lr=-1"])
    msg = str(e.value)
    assert len(e.value.problems) == 4, msg  # and model.config is empty
    assert "override 'model.config={model_type: llama': the value is not valid YAML (did not find expected ',' or '}')" in msg
    assert "override 'trainer.max_steps=[1'" in msg and "quote the whole override" in msg
    assert "optim.lr=-1.0: must be > 0" in msg


def test_cross_field_checks(tmp_path):
    path = _recipe(tmp_path, "strategy:\n  name: ddp\n  stage: 2\n  offload_parameters: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "model.pretrained=null and model.config={}" in msg
    assert "offload needs strategy.name=deepspeed" in msg
    assert "parameter offload needs stage 3" in msg


def test_rope_scaling_is_checked_like_a_config_json(tmp_path):
    path = _recipe(tmp_path, BASE)
    cfg = load_config(path, ["rope.scaling={rope_type: yarn, factor: 8.0}"])
    assert cfg.rope.scaling == {"rope_type": "yarn", "factor": 8.0}
    with pytest.raises(ConfigError) as e:
        load_config(path, ["rope.scaling={rope_type: llama3, factor: 8.0}", "rope.theta=0"])
    msg = str(e.value)
    assert "rope.scaling: rope type 'llama3' needs low_freq_factor, high_freq_factor" in msg
    assert "rope.theta=0.0: must be > 0" in msg
    with pytest.raises(ConfigError, match="rope.scaling: rope type 'ntk' is not supported"):
        load_config(path, ["rope.scaling={rope_type: ntk, factor: 2}"])


@pytest.mark.parametrize("old, new, value", [
    ("model.rope_theta", "rope.theta", 40000.0),
    ("model.rope_scaling", "rope.scaling", {"rope_type": "dynamic", "factor": 2.0}),
    ("optim.gate_lr", "attention.gate_lr", 0.05),
])
def test_moved_keys_still_read_with_a_warning_naming_the_new_one(tmp_path, old, new, value):
    recipe = _recipe(tmp_path, BASE + "attention:\n  kind: infini\n")
    with pytest.warns(DeprecatedKeyWarning, match=f"{old} \\(command line\\) is deprecated: write {new} instead"):
        cfg = load_config(recipe, [f"{old}={value}"])
    section, key = new.split(".")
    got = cfg.attention.options[key] if section == "attention" else getattr(getattr(cfg, section), key)
    assert got == value
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)  # what a run saves uses the new keys: no warning reading it back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(saved) == cfg


def test_validate_changes_nothing_and_load_config_resolves(tmp_path):
    cfg = load_config(_recipe(tmp_path, BASE), ["attention.kind=infini", "attention.segment_len=64"])
    assert cfg.attention.options["segment_len"] == 64 and cfg.attention.options["gate_init"] == -2.5
    bare = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, options={"segment_len": 64,
                                                                                         "backend": "sdpa"}))
    before = copy.deepcopy(bare)
    validate(bare)
    assert bare == before  # reported, not filled in
    assert resolve(bare).attention.options == cfg.attention.options  # another kind's option left out


def test_data_task_is_checked_against_the_datamodule_registry(tmp_path, monkeypatch):
    from longcpt.data.datamodule import DATAMODULES

    with pytest.raises(ConfigError, match=r"data.task='paskey': no DataModule registered for it \(known: "
                                          r"booksum, passkey, pretrain\); did you mean passkey\?"):
        load_config(_recipe(tmp_path, BASE), ["data.task=paskey"])
    monkeypatch.setitem(DATAMODULES, "summaries", lambda cfg, tokenizer: None)  # a task registered elsewhere
    assert load_config(_recipe(tmp_path, BASE), ["data.task=summaries"]).data.task == "summaries"


def test_paths_checked_only_when_asked(tmp_path):
    path = _recipe(tmp_path, BASE + "data:\n  train: /no/such/data\n")
    load_config(path)  # structure and values are fine
    with pytest.raises(ConfigError, match="data.train='/no/such/data': path does not exist"):
        load_config(path, check_paths=True)


def test_bad_files_name_the_file_and_line(tmp_path):
    with pytest.raises(LongcptError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = _recipe(tmp_path, "model:\n  config: {a: 1\n")
    with pytest.raises(LongcptError, match=r"r.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(_recipe(tmp_path, BASE), ["trainer.max_steps=11"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
