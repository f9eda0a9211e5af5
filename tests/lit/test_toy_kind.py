"""A new trainable attention kind needs only its folder and its registration: the toy kind of
tests/toy_kind/ (one parameter per layer) trains through `longcpt train` with its own optimizer
group and metrics, is planned, and exports a folder `from_pretrained` reads back as the toy."""

from __future__ import annotations

import importlib
import sys

import pytest
from lit_helpers import SyntheticDataModule, read_metrics, tiny_overrides

from longcpt.config import load_config
from longcpt.lit.train import train
from longcpt.model import from_pretrained
from longcpt.model.attention import KINDS


@pytest.fixture
def toy_kind():
    sys.modules.pop("toy_kind", None)
    importlib.import_module("toy_kind")  # its registration
    yield "toy"
    KINDS.pop("toy", None)
    sys.modules.pop("toy_kind", None)


def test_a_toy_kind_trains_logs_plans_and_exports(toy_kind, tmp_path, tokenizer_dir):
    from longcpt.plan import estimate

    cfg = load_config(None, tiny_overrides(tmp_path / "run", tokenizer_dir, attention__kind="toy",
                                           attention__scale_lr=0.25, trainer__max_steps=3,
                                           trainer__export_hf="true"))
    assert cfg.attention.options == {"scale_lr": 0.25}
    assert estimate(cfg, suggest=False).step.pairs.pairs == 32 * 33 / 2  # its plan terms: the whole window
    result = train(cfg, datamodule=SyntheticDataModule(cfg.data.seq_len, cfg.data.micro_batch_size))
    m = read_metrics(tmp_path / "run")
    lr, base = m["train/lr_scale"], m["train/lr"]
    assert all(abs(lr[s] / base[s] - 0.25 / cfg.optim.lr) < 1e-6 for s in lr)  # its own group, same schedule
    scales = m["train/scale/mean"]
    assert len(scales) == 3 and scales[max(scales)] != 1.0  # its metric, and the parameter trained
    back = from_pretrained(result.hf_dir).eval()
    assert back.args.attention == "toy"
    assert float(back.model.layers[0].self_attn.core.scale.detach()) != 1.0
