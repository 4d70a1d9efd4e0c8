"""examples/skip_token against its formula in plain PyTorch, and its declarations."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT
from titan_objectives import IGNORE_INDEX, Features, ModelInfo, OptionError

MODEL = ModelInfo(dim=8, n_layers=2, vocab_size=16, seq_len=10)


@pytest.fixture
def skip_token(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "skip_token"))
    import skip_token

    return skip_token


def test_loss_and_gradients_are_the_formulas(skip_token):
    torch.manual_seed(0)
    objective = skip_token.SkipToken(skip_token.SkipTokenOptions(offset=2, chunk_size=7), MODEL)
    objective.init_weights()
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    labels = torch.randint(0, 16, (2, 10))
    labels[1, 4] = IGNORE_INDEX
    out = objective(Features(labels=labels, final_hidden=hidden))
    out.loss_sum.backward()
    ours = hidden.grad.clone(), objective.head.weight.grad.clone()
    hidden.grad = None
    objective.zero_grad()

    projected = objective.norm(F.silu(objective.projection(hidden)))
    logits = projected @ objective.head.weight.T
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-2] = labels[:, 2:]  # labels[t + 2]; the last 2 positions score nothing
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    reference.backward()
    torch.testing.assert_close(out.loss_sum, reference)
    torch.testing.assert_close(ours, (hidden.grad, objective.head.weight.grad))
    scored = out.metrics["scored"]
    assert (scored.total / scored.count).item() == pytest.approx(15 / 20)  # 16 minus the -100


def test_declarations_and_options(skip_token):
    objective = skip_token.SkipToken(skip_token.SkipTokenOptions(offset=3), MODEL)
    needs = objective.requirements()
    assert (needs.final_hidden, needs.lookahead, needs.shard_reach) == (True, 3, 0)
    assert not needs.logits and not needs.output_weight
    assert set(objective.tensor_parallel_plan()) == {"projection", "norm", "head"}
    with pytest.raises(OptionError, match=r"offset = 10 is not allowed; expected an integer"):
        skip_token.SkipTokenOptions(offset=10).validate(MODEL)
