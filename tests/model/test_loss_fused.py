"""The chunked loss with in-forward gradients equals PyTorch's plain cross-entropy and its autograd."""

import pytest
import torch
import torch.nn.functional as F

from longcpt.model.loss import chunked_cross_entropy


def plain(hidden, weight, labels, reduction):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_loss_and_gradients_equal_plain_cross_entropy(reduction, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 25, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 25), generator=g)
    labels[0, :5] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, chunk, reduction)
    ref = plain(hidden, weight, labels, reduction)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    (2.5 * loss).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (2.5 * ref).backward()
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-5)  # logits are fp32 in both
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-5)


def test_tied_weight_gets_both_gradients_and_all_ignored_is_zero():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(30, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 30, (1, 12), generator=g)
    labels = torch.full((1, 12), -100)
    loss = chunked_cross_entropy(emb[ids], emb, labels, 5)
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() == 0
    labels = torch.roll(ids, -1, 1)
    emb.grad = None
    chunked_cross_entropy(emb[ids], emb, labels, 5).backward()
    fused = emb.grad.clone()
    emb.grad = None
    plain(emb[ids], emb, labels, "mean").backward()
    torch.testing.assert_close(fused, emb.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["autocast", "bf16-true"])
def test_bf16_matches_autograd_of_the_plain_loss(mode):
    g = torch.Generator().manual_seed(2)
    dtype = torch.float32 if mode == "autocast" else torch.bfloat16
    hidden = torch.randn(40, 32, generator=g).to(dtype).requires_grad_()
    weight = (0.2 * torch.randn(50, 32, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (40,), generator=g)
    results = []
    for fn in (
        lambda: chunked_cross_entropy(hidden, weight, labels, 16),
        lambda: plain(hidden, weight, labels, "mean"),
    ):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            loss = fn()
        loss.backward()
        assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype
        results.append((loss.detach(), hidden.grad.float(), weight.grad.float()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_no_grad_path():
    hidden, weight = torch.randn(10, 4), torch.randn(6, 4)
    labels = torch.randint(0, 6, (10,))
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_cross_entropy(hidden, weight, labels, 3), plain(hidden, weight, labels, "mean")
        )
