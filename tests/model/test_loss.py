"""The chunked cross-entropy equals the plain full-logits loss, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcpt.model.loss import chunked_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_equals_plain_loss_and_gradient(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 50, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (3, 50), generator=g)
    labels[0, :10] = -100
    labels[2, -5:] = -100

    plain = F.cross_entropy((hidden @ weight.T).reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    want = torch.autograd.grad(plain, (hidden, weight))
    ours = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    got = torch.autograd.grad(ours, (hidden, weight))

    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sum_reduction_and_all_ignored():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(5, 8)
    labels = torch.full((10,), -100)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=3)
    assert loss.item() == 0.0
    loss.backward()  # still connected to the graph
    assert torch.count_nonzero(hidden.grad) == 0
    with torch.no_grad():  # evaluation: a tensor too (sequence parallelism all-reduces it)
        for reduction in ("sum", "mean"):
            value = chunked_cross_entropy(hidden, weight, labels, chunk_size=3, reduction=reduction)
            assert isinstance(value, torch.Tensor) and value.item() == 0.0
    labels[:4] = torch.tensor([0, 1, 2, 3])
    total = chunked_cross_entropy(hidden, weight, labels, chunk_size=3, reduction="sum")
    mean = chunked_cross_entropy(hidden, weight, labels, chunk_size=3)
    torch.testing.assert_close(total / 4, mean)


def test_only_one_chunk_of_logits_is_kept_for_backward():
    """Memory check: saved tensors for backward exclude (T, V) logits."""
    t, v, d, chunk = 4096, 2048, 32, 256
    hidden = torch.randn(t, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    labels = torch.randint(0, v, (t,))
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    assert max(saved) < t * v / 4  # the full logits (t*v) are never saved


def test_only_labelled_rows_reach_the_projection(monkeypatch):
    """Answer-only rows: the (rows x V) matmuls run on the labelled tokens alone, same loss and grads."""
    import longcpt.model.loss as loss_module

    seen = []
    original = loss_module._chunk_log_probs

    def spy(h, weight, y):
        seen.append(h.shape[0])
        return original(h, weight, y)

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 136, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.full((4, 136), -100)
    labels[:, 100:106] = torch.randint(0, 40, (4, 6), generator=g)  # 6 answer tokens per row
    plain = F.cross_entropy((hidden @ weight.T).reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    want = torch.autograd.grad(plain, (hidden, weight))

    monkeypatch.setattr(loss_module, "_chunk_log_probs", spy)
    ours = chunked_cross_entropy(hidden, weight, labels, chunk_size=16)
    got = torch.autograd.grad(ours, (hidden, weight))
    assert sum(seen) == 24  # not 4 x 136
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
