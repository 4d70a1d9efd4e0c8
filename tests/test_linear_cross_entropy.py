"""Chunked linear cross-entropy against the plain path (logits, then F.cross_entropy)."""

import pytest
import torch
import torch.nn.functional as F

from titan_objectives.losses import linear_cross_entropy_sum

TOKENS, DIM, VOCAB = 37, 16, 50


def plain(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def inputs(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(TOKENS, DIM, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(VOCAB, DIM)).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (TOKENS,))
    labels[[0, 5, 36]] = -100
    return hidden, weight, labels


def value_and_grads(fn, hidden, weight, labels, scale=0.37):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64, 5])
def test_matches_plain_cross_entropy_fp32(chunk_size):
    hidden, weight, labels = inputs()
    expected = value_and_grads(plain, hidden, weight, labels)
    got = value_and_grads(
        lambda h, w, y: linear_cross_entropy_sum(h, w, y, chunk_size), hidden, weight, labels
    )
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-4, atol=1e-6)


def test_matches_plain_cross_entropy_bf16():
    hidden, weight, labels = inputs(torch.bfloat16)
    expected = value_and_grads(plain, hidden, weight, labels)
    got = value_and_grads(
        lambda h, w, y: linear_cross_entropy_sum(h, w, y, 8), hidden, weight, labels
    )
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2], expected[2], rtol=2e-2, atol=2e-3)


def test_batched_shapes_and_all_ignored():
    hidden, weight, labels = inputs()
    loss = linear_cross_entropy_sum(hidden.view(1, TOKENS, DIM), weight, labels.view(1, TOKENS), 4)
    torch.testing.assert_close(loss, plain(hidden, weight, labels), rtol=1e-5, atol=0)
    none = torch.full((TOKENS,), -100)
    assert linear_cross_entropy_sum(hidden, weight, none, 4).item() == 0.0


def test_no_grad_path_returns_the_same_value():
    hidden, weight, labels = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, labels, 8)
    torch.testing.assert_close(loss, plain(hidden, weight, labels).detach(), rtol=1e-5, atol=0)


def test_chunk_size_must_be_positive():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="chunk_size must be > 0, got 0"):
        linear_cross_entropy_sum(hidden, weight, labels, 0)
