"""`longcpt train` with strategy.sequence_parallel=2 on two CPU processes (gloo) gives the weights of
the one-process run, under DDP and under DeepSpeed ZeRO-3.

Real prepared data, AnchorAttention, windows of 64 tokens whose documents cross the middle (each
rank holds 32 tokens), 2 windows per micro-batch. The two ranks form one group, so they read the
same windows as the single process (data-parallel degree 1) and must reach its weights; the loss
they log is the whole window's.
"""

import pytest
import torch
from lit_helpers import read_metrics, run_train, tiny_overrides

from longcpt.export.convert import read_checkpoint

pytestmark = pytest.mark.slow


def launch(out, corpus, devices, steps, **extra):
    args = tiny_overrides(out, None, corpus, attention__kind="anchor", trainer__devices=devices,
                          trainer__max_steps=steps, optim__min_lr_ratio=1.0, **extra)
    result = run_train(args, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("sp")
    launch(root / "one", corpus, 1, 4)
    launch(root / "ddp", corpus, 2, 4, strategy__name="ddp", strategy__sequence_parallel=2)
    launch(root / "zero3", corpus, 2, 4, strategy__name="deepspeed", strategy__stage=3, strategy__sequence_parallel=2)
    return root


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_sequence_parallel_weights_equal_one_process(runs, name):
    ref, _ = read_checkpoint(runs / "one")
    got, meta = read_checkpoint(runs / name)
    assert meta["config"]["strategy"]["sequence_parallel"] == 2
    assert ref.keys() == got.keys()
    # Four AdamW steps at lr 3e-3 move weights by about 1e-2; summation order leaves float32 noise
    # of about 1e-6. Another window, a lost token at the rank boundary or a wrong attention would
    # differ by the size of a step (~1e-3).
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-5, msg=k)


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_logged_loss_and_tokens_are_the_windows(runs, name):
    ref, got = read_metrics(runs / "one"), read_metrics(runs / name)
    assert sorted(got["train/loss"]) == [0, 1, 2, 3]
    for step, loss in ref["train/loss"].items():
        assert got["train/loss"][step] == pytest.approx(loss, rel=1e-5)
    # Both ranks train on the same 2 windows of 64 tokens per step: counted once.
    assert got["train/tokens"][3] == ref["train/tokens"][3] == 4 * 2 * 64
