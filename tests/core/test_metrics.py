import pytest
import torch

from titan_objectives.hosts.common.running_metrics import ObjectiveMetrics
from titan_objectives.objective import MeanMetric, ObjectiveOutput
from titan_objectives.stack import StackOutput


def micro_batch(ntp, nitp, cos_total, cos_count):
    return StackOutput(
        weighted_loss_sum=torch.tensor(0.0),
        outputs={
            "ntp": ObjectiveOutput(torch.tensor(ntp)),
            "nitp": ObjectiveOutput(
                torch.tensor(nitp),
                {"cosine": MeanMetric(torch.tensor(cos_total), torch.tensor(cos_count))},
            ),
        },
    )


def test_sums_over_micro_batches_then_normalizes():
    metrics = ObjectiveMetrics()
    metrics.reset({"ntp": 1.0, "nitp": 0.5})
    tokens = torch.tensor(10.0)
    metrics.add(micro_batch(30.0, 4.0, 3.0, 4), tokens)
    metrics.add(micro_batch(20.0, 6.0, 1.0, 6), tokens)
    reduced = metrics.reduce(mesh=None)
    assert reduced.losses == pytest.approx({"ntp": 5.0, "nitp": 1.0})
    logged = reduced.logged
    assert logged["objectives/ntp/loss"] == pytest.approx(5.0)
    assert logged["objectives/nitp/loss"] == pytest.approx(1.0)
    assert logged["objectives/nitp/cosine"] == pytest.approx(0.4)  # 4 / 10, not mean of means
    assert logged["objectives/nitp/weight"] == 0.5
    assert logged["objectives/total/loss"] == pytest.approx(5.5)
    metrics.reset({"ntp": 1.0})
    assert metrics.reduce(mesh=None).logged == {}
