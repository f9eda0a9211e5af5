"""Several fine-tuning examples per row (`data.pack_examples`): rows, plans, resume, and the loss."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_args

from longcpt.config import ConfigError, load_config
from longcpt.data.collate import Collator
from longcpt.data.packing import best_fit_decreasing
from longcpt.data.task import TaskDataModule, answer_only_row, pack_examples, packed_row
from longcpt.model import CausalLM


def test_packed_row_puts_each_example_in_its_own_document():
    row = packed_row([([1, 5, 6], [7, 2]), ([1, 8], [9, 2])], 10, 0)
    assert row["input_ids"] == [1, 5, 6, 7, 2, 1, 8, 9, 2, 0]
    assert row["labels"] == [-100, -100, 7, 2, -100, -100, 9, 2, -100, -100]
    assert row["doc_lens"] == [5, 4, 1]
    on_input = packed_row([([1, 5, 6], [7, 2]), ([1, 8], [9, 2])], 9, 0, train_on_input=True)
    assert on_input["labels"] == [5, 6, 7, 2, -100, 8, 9, 2, -100] and on_input["doc_lens"] == [5, 4]
    assert packed_row([([1, 5, 6], [7, 2])], 8, 0) == answer_only_row([1, 5, 6], [7, 2], 8, 0)
    with pytest.raises(ValueError, match="9 tokens together"):
        packed_row([([1, 5, 6], [7, 2]), ([1, 8], [9, 2])], 8, 0)


def test_best_fit_decreasing_fills_the_tightest_bin():
    assert best_fit_decreasing([3, 5, 2, 4], 8) == [[1, 0], [3, 2]]
    assert best_fit_decreasing([6, 6, 2, 2], 8) == [[0, 2], [1, 3]]
    assert best_fit_decreasing([], 8) == []


@pytest.mark.parametrize("buffer_size", [1, 7, 64])
def test_pack_examples_places_every_example_once_per_buffer(buffer_size):
    sizes = [int(s) for s in torch.randint(3, 60, (200,), generator=torch.Generator().manual_seed(0))]
    rows = list(pack_examples(sizes, range(200), 64, buffer_size, seed=3))
    assert sorted(itertools.chain.from_iterable(rows)) == list(range(200))
    assert all(sum(sizes[e] for e in row) <= 64 for row in rows)
    # Rows never mix two buffers, so a buffer's examples are all placed before the next one's.
    first_buffer = [max(row) // buffer_size for row in rows]
    assert first_buffer == sorted(first_buffer)
    assert rows == list(pack_examples(sizes, range(200), 64, buffer_size, seed=3))  # a pure function
    if buffer_size == 64:  # mixed sizes share rows: far fewer rows than examples
        assert len(rows) < 200 * 0.7


def _datamodule(pairs, seq_len, *extra):
    cfg = load_config(None, ["model.config={model_type: llama}", "model.tokenizer=tok", "data.task=passkey",
                             "data.train=x", f"data.seq_len={seq_len}", "data.micro_batch_size=2",
                             "data.num_workers=0", "data.pack_examples=true", "data.bfd_buffer=16",
                             "attention.kind=intra_doc", *extra])
    return TaskDataModule(cfg, SimpleNamespace(pad_token_id=0, eos_token_id=2), lambda path, n: pairs)


def test_packed_datamodule_resumes_after_the_rows_it_consumed():
    pairs = [([1] + [5] * (i % 13 + 1), [7, 2]) for i in range(50)]

    def rows(dm):
        return [r for b in itertools.islice(iter(dm.train_dataloader()), 12) for r in b["input_ids"].tolist()]

    whole = rows(_datamodule(pairs, 32))
    resumed = _datamodule(pairs, 32)
    resumed._resumed_at = (6, 0)  # 3 steps of 2 rows consumed before the restart
    assert rows(resumed)[:18] == whole[6:]
    assert sum(row.count(1) for row in whole) > 2 * len(whole)  # several examples (BOS each) per row


def test_packed_rows_give_the_loss_of_one_example_per_row():
    """With document masking and restarting positions (intra_doc) a packed row is exactly its
    examples in rows of their own: same labelled tokens, same logits, same mean loss."""
    examples = [([1, 11, 12, 13, 14], [15, 16, 2]), ([1, 21, 22], [23, 2]), ([1, 31, 32, 33], [34, 35, 2])]
    torch.manual_seed(0)
    model = CausalLM(tiny_args(attention="intra_doc")).eval()
    collate = Collator("intra_doc")
    packed = collate([packed_row(examples, 24, 0)])
    alone = collate([answer_only_row(p, t, 8, 0) for p, t in examples])
    with torch.no_grad():
        got = model.loss(packed["input_ids"], packed["labels"], packed["position_ids"], packed["cu_seqlens"])
        want = model.loss(alone["input_ids"], alone["labels"], alone["position_ids"], alone["cu_seqlens"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_packing_is_refused_where_examples_would_see_each_other():
    with pytest.raises(ConfigError, match="pack_examples=true with attention.kind=full"):
        load_config(None, ["model.config={model_type: llama}", "model.tokenizer=tok", "data.task=passkey",
                           "data.train=x", "data.pack_examples=true", "attention.kind=full"], check_paths=False)
    with pytest.raises(ConfigError, match="pack_examples=true: applies to task fine-tuning only"):
        load_config(None, ["model.config={model_type: llama}", "model.tokenizer=tok", "data.train=x",
                           "data.pack_examples=true"], check_paths=False)
