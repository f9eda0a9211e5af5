"""WindowStream and PretrainDataModule without a Trainer: order, shards, workers, exact resume."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longcpt.config import load_config
from longcpt.data.collate import Collator
from longcpt.data.datamodule import DATAMODULES, PretrainDataModule, build_datamodule, register_datamodule
from longcpt.data.packing import pack_documents
from longcpt.data.stream import TokenStore, WindowStream
from longcpt.errors import LongcptError

IDS = {"bos_id": 1, "eos_id": 2, "pad_id": 0}


def datamodule(path, **kw):
    args = {"seq_len": 32, "micro_batch_size": 2, "num_workers": 0, "seed": 3, "attention_kind": "anchor"} | kw
    return PretrainDataModule(path, **args, **IDS)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out


def same(a, b):
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
        for x, y in zip(a, b)
    )


def test_token_store_reads_the_documents(prepared):
    path, docs = prepared
    store = TokenStore(path)
    assert store.lengths.tolist() == [len(d) for d in docs]
    assert all(store[i].tolist() == d for i, d in enumerate(docs))


@pytest.mark.parametrize("strategy", ["chunk", "bfd"])
def test_stream_started_at_k_equals_the_tail_across_epochs(prepared, strategy):
    path, docs = prepared
    stream = WindowStream(TokenStore(path).lengths, 32, strategy, seed=5, buffer_size=7)
    full = [w for _, w in zip(range(150), stream.plan())]  # (index, pieces); 42-46 windows per epoch
    assert [i for i, _ in full] == list(range(150))
    for k in (0, 1, 41, 42, 43, 46, 100):
        assert [w for _, w in zip(range(150 - k), stream.plan(start=k))] == full[k:]


def test_windows_are_pack_documents_of_the_epoch_order(prepared):
    path, docs = prepared
    store = TokenStore(path)
    stream = WindowStream(store.lengths, 32, "chunk", seed=5)
    order = stream.epoch_documents(0)
    reference = list(pack_documents([docs[i] for i in order], 32, **IDS))
    built = [w for _, w in zip(range(len(reference)), stream.windows(store, **IDS))]
    for a, b in zip(built, reference):
        assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["doc_lens"] == b["doc_lens"]


def test_epochs_reshuffle_and_rank_shards_partition_each_epoch(prepared):
    path, _ = prepared
    lengths = TokenStore(path).lengths
    streams = [WindowStream(lengths, 32, seed=5, rank=r, world_size=3) for r in range(3)]
    for epoch in range(3):
        shards = [s.epoch_documents(epoch) for s in streams]
        assert sorted(np.concatenate(shards).tolist()) == list(range(len(lengths)))  # disjoint, complete
    assert streams[0].epoch_documents(0).tolist() != streams[0].epoch_documents(1).tolist()
    again = WindowStream(lengths, 32, seed=5, rank=0, world_size=3)
    assert again.epoch_documents(1).tolist() == streams[0].epoch_documents(1).tolist()
    assert WindowStream(lengths, 32, seed=6).epoch_documents(0).tolist() != \
        WindowStream(lengths, 32, seed=5).epoch_documents(0).tolist()


def test_workers_do_not_change_the_stream(prepared):
    path, _ = prepared
    plain = datamodule(path, num_workers=0)
    plain.setup("fit")
    workers = datamodule(path, num_workers=2)
    workers.setup("fit")
    a, b = take(plain.train_dataloader(), 9), take(workers.train_dataloader(), 9)
    assert same(a, b)
    # and the batches are the stream's windows in order
    windows = [w for _, w in zip(range(18), plain.train_stream.windows(plain._train_store, **IDS))]
    ref = [Collator("anchor")(windows[i : i + 2]) for i in range(0, 18, 2)]
    assert same(a, ref)


@pytest.mark.parametrize("packing", ["chunk", "bfd"])
def test_resume_from_state_dict_continues_with_the_next_window(prepared, packing):
    """Without a Trainer: state after 7 steps of 2 windows, restored into a new DataModule whose
    loader (2 workers) continues with exactly batch 8 of the uninterrupted stream, past an epoch end."""
    path, _ = prepared
    first = datamodule(path, packing=packing, num_workers=2)
    first.setup("fit")
    uninterrupted = take(first.train_dataloader(), 40)  # 80 windows: the second epoch starts at 42 (chunk) or 46 (bfd)

    first.trainer = SimpleNamespace(global_step=7, accumulate_grad_batches=1, global_rank=0, world_size=1)
    state = first.state_dict()
    assert state["consumed_samples"] == 14
    resumed = datamodule(path, packing=packing, num_workers=2)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert same(take(resumed.train_dataloader(), 33), uninterrupted[7:])


def test_consumed_samples_counts_accumulation_and_earlier_resumes(prepared):
    path, _ = prepared
    dm = datamodule(path, micro_batch_size=3)
    dm.setup("fit")
    dm.load_state_dict({"consumed_samples": 100, "global_step": 10})
    dm.trainer = SimpleNamespace(global_step=14, accumulate_grad_batches=4)
    assert dm.consumed_samples() == 100 + 4 * 4 * 3


def test_resume_with_a_different_stream_warns(prepared):
    path, _ = prepared
    dm = datamodule(path)
    dm.setup("fit")
    state = dm.state_dict() | {"seed": 99}
    with pytest.warns(UserWarning, match="seed 99 -> 3"):
        dm.load_state_dict(state)


def test_ranks_get_disjoint_windows(prepared):
    path, docs = prepared
    seen = []
    for rank in range(2):
        dm = datamodule(path, micro_batch_size=1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, accumulate_grad_batches=1)
        dm.setup("fit")
        epoch_docs = set(dm.train_stream.epoch_documents(0).tolist())
        seen.append(epoch_docs)
        # the windows of the first epoch hold exactly this rank's documents
        n_windows = sum(1 for _ in dm.train_stream.plan(epochs=1))
        tokens = torch.cat([b["input_ids"][0] for b in take(dm.train_dataloader(), n_windows)]).tolist()
        expect = sorted(t for i in epoch_docs for t in docs[i])
        assert sorted(t for t in tokens if t > 2) == expect
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(docs)


def test_validation_windows_are_fixed_and_limited(tmp_path, make_dataset, prepared):
    path, _ = prepared
    val_docs = make_dataset(tmp_path / "val", [30] * 20, seed=9)
    dm = datamodule(path, val=tmp_path / "val", val_batches=3, seq_len=16)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert len(batches) == 3 and all(b["input_ids"].shape == (2, 16) for b in batches)
    reference = list(pack_documents(val_docs, 16, **IDS))[:6]  # unshuffled, stored order
    assert [r.tolist() for b in batches for r in b["input_ids"]] == [w["input_ids"].tolist() for w in reference]
    assert same(batches, list(dm.val_dataloader()))
    assert datamodule(path).val_dataloader() == []
    # more ranks than validation documents: every rank evaluates the whole (small) set
    make_dataset(tmp_path / "tiny_val", [30] * 3, seed=9)
    ranked = datamodule(path, val=tmp_path / "tiny_val", val_batches=1, seq_len=16)
    ranked.trainer = SimpleNamespace(global_rank=3, world_size=4, global_step=0, accumulate_grad_batches=1)
    ranked.setup("fit")
    assert len(list(ranked.val_dataloader())) == 1


def test_bad_data_paths_name_the_problem(tmp_path, prepared):
    with pytest.raises(LongcptError, match="not found"):
        TokenStore(tmp_path / "missing")
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"input_ids": [[5]]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(LongcptError, match="splits train"):
        TokenStore(tmp_path / "dd")
    Dataset.from_dict({"text": ["hi"]}).save_to_disk(str(tmp_path / "raw"))
    with pytest.raises(LongcptError, match="no input_ids column"):
        TokenStore(tmp_path / "raw")
    with pytest.raises(LongcptError, match="2 ranks"):
        WindowStream(np.array([4]), 8, world_size=2)


def test_build_datamodule_dispatches_on_the_task(prepared):
    path, _ = prepared
    cfg = load_config(None, ["model.config.hidden_size=8", "model.tokenizer=tok", f"data.train={path}",
                             "data.seq_len=64", "data.micro_batch_size=2", "attention.kind=intra_doc",
                             "trainer.seed=4"])
    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dm = build_datamodule(cfg, tokenizer)
    assert isinstance(dm, PretrainDataModule) and dm.seq_len == 64 and dm.seed == 4
    assert dm.collator.kind == "intra_doc"

    @register_datamodule("unit_test_task")
    def factory(cfg, tokenizer):
        return ("built", cfg.data.seq_len)

    try:
        cfg.data.task = "unit_test_task"
        assert build_datamodule(cfg, tokenizer) == ("built", 64)
        cfg.data.task = "no_such_task"
        with pytest.raises(LongcptError, match="no_such_task"):
            build_datamodule(cfg, tokenizer)
    finally:
        DATAMODULES.pop("unit_test_task")
