"""``ntp``: next-token prediction, with torchtitan's cross-entropy semantics."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titan_objectives.objective import (
    IGNORE_INDEX,
    Features,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    Requirements,
)
from titan_objectives.registry import register_objective


@dataclass
class NTPOptions(ObjectiveOptions):
    pass


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over positions whose label is not ``IGNORE_INDEX``.

    fp32 logits, as torchtitan's ``cross_entropy_loss``: an NTP-only stack must give the
    same numbers as plain torchtitan, bit for bit.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(0, 1),
        reduction="sum",
        ignore_index=IGNORE_INDEX,
    )


@register_objective("ntp")
class NextTokenPrediction(Objective):
    """Cross-entropy of the model's logits against the next token."""

    Options = NTPOptions

    def requirements(self) -> Requirements:
        return Requirements(logits=True)

    def forward(self, features: Features) -> ObjectiveOutput:
        return ObjectiveOutput(cross_entropy_sum(features.logits, features.labels))
