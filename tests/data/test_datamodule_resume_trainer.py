"""Exact resume through a real lightning.Trainer: N steps in one go == M steps + checkpoint + resume to N."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from longcpt.data.datamodule import PretrainDataModule

IDS = {"bos_id": 1, "eos_id": 2, "pad_id": 0}


class Recorder(L.LightningModule):
    """Records every micro-batch it trains on; its one weight keeps the optimizer honest."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(path, root, max_steps, ckpt_path=None, save_every=None):
    dm = PretrainDataModule(path, seq_len=32, packing="chunk", micro_batch_size=2, num_workers=2, seed=7,
                            attention_kind="anchor", **IDS)
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=save_every, save_top_k=-1,
                                 save_last=True)] if save_every else []
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        enable_checkpointing=bool(save_every), callbacks=callbacks, limit_val_batches=0,
        default_root_dir=str(root),
    )
    model = Recorder()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.slow
def test_resumed_stream_equals_uninterrupted(tmp_path, make_dataset):
    # 10 short documents: about 7 windows per epoch, so 6 steps x 2 accumulated x 2 windows = 24
    # windows cross three epoch boundaries, and the resume point (window 12) lies mid-epoch.
    make_dataset(tmp_path / "data", [20, 3, 17, 9, 25, 11, 14, 6, 19, 22], seed=2)
    path = tmp_path / "data"

    uninterrupted = fit(path, tmp_path / "a", max_steps=6)
    assert len(uninterrupted) == 12  # micro-batches

    first = fit(path, tmp_path / "b", max_steps=3, save_every=3)
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["PretrainDataModule"]
    assert state["consumed_samples"] == 3 * 2 * 2 and state["global_step"] == 3
    second = fit(path, tmp_path / "b", max_steps=6, ckpt_path=str(ckpt))

    resumed = first + second
    assert len(resumed) == len(uninterrupted)
    for k, (a, b) in enumerate(zip(resumed, uninterrupted)):
        assert torch.equal(a, b), f"micro-batch {k} differs"
    rows = [tuple(r.tolist()) for b in uninterrupted for r in b]
    assert len(set(rows)) > 7  # the windows do change along the stream (epochs reshuffle)
