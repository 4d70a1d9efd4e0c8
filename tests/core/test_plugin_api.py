"""The helpers a plugin uses, imported the way a plugin imports them (the package's
public names only), against plain PyTorch formulas."""

import pytest
import torch
import torch.nn.functional as F

import titan_objectives as to

TOKENS, DIM, VOCAB = 12, 8, 32


def hidden_weight_labels():
    torch.manual_seed(0)
    hidden = torch.randn(2, TOKENS // 2, DIM, requires_grad=True)
    weight = torch.randn(VOCAB, DIM, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, TOKENS // 2))
    labels[0, 1] = to.IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("backend", ["chunked", "auto"])
def test_linear_cross_entropy_sum_is_the_cross_entropy_of_the_head(backend):
    hidden, weight, labels = hidden_weight_labels()
    ours = to.losses.linear_cross_entropy_sum(hidden, weight, labels, chunk_size=5, backend=backend)
    ours.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(
        (hidden @ weight.T).flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100
    )
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grads, (hidden.grad, weight.grad))


def test_linear_sparse_cross_entropy_sum_is_the_soft_target_cross_entropy():
    hidden, weight, _ = hidden_weight_labels()
    ids = torch.randint(0, VOCAB, (2, TOKENS // 2, 3))
    ids[..., 1] = (ids[..., 0] + 1) % VOCAB  # distinct ids per row
    ids[..., 2] = (ids[..., 0] + 2) % VOCAB
    probs = torch.softmax(torch.randn(2, TOKENS // 2, 3), dim=-1)
    ours = to.losses.linear_sparse_cross_entropy_sum(hidden, weight, ids, probs, chunk_size=4)
    ours.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    dense = torch.zeros(2, TOKENS // 2, VOCAB).scatter(-1, ids, probs)
    reference = -(dense * torch.log_softmax(hidden @ weight.T, dim=-1)).sum()
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grads, (hidden.grad, weight.grad))


def test_vocabulary_and_sequence_helpers_on_one_rank_are_the_plain_formulas():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, VOCAB)
    torch.testing.assert_close(to.vocabulary.logsumexp(logits), torch.logsumexp(logits, -1))
    torch.testing.assert_close(to.vocabulary.log_softmax(logits), torch.log_softmax(logits, dim=-1))
    index = torch.randint(0, VOCAB, (2, 5, 1))
    torch.testing.assert_close(to.vocabulary.gather(logits, index), logits.gather(-1, index))
    sequence = to.SequenceShards()
    x = torch.arange(10.0).view(2, 5)
    assert torch.equal(sequence.shift_left(x, 2, -1.0)[0], torch.tensor([2.0, 3, 4, -1, -1]))
    assert torch.equal(sequence.sum(x.sum()), x.sum())
    assert torch.equal(sequence.local(x), x)
