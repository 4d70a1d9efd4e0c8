import pytest
import torch
from torchtitan.components.loss import cross_entropy_loss

from titan_objectives import Features, ModelInfo, get_objective

MODEL = ModelInfo(dim=8, n_layers=2, vocab_size=11, seq_len=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ntp_equals_torchtitans_cross_entropy(dtype):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=dtype)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    ntp = get_objective("ntp")(get_objective("ntp").Options(), MODEL)
    out = ntp(Features(labels=labels, logits=logits))
    assert torch.equal(out.loss_sum, cross_entropy_loss(logits, labels))


def test_ntp_is_a_sum_over_valid_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 4))
    labels[1, 3] = -100
    ntp = get_objective("ntp")(get_objective("ntp").Options(), MODEL)
    loss = ntp(Features(labels=labels, logits=logits)).loss_sum
    expected = sum(
        -torch.log_softmax(logits[b, t], -1)[labels[b, t]]
        for b in range(2)
        for t in range(4)
        if labels[b, t] != -100
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[1, 3].abs().sum() == 0
