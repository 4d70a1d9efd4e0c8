"""PaLM's z-loss (Chowdhery et al. 2022, section 5): ``coefficient * log(Z)^2`` per token,
where ``Z`` is the softmax normalizer of the logits. It keeps ``log Z`` near 0, which
stabilizes training in low precision.

It reads the logits through ``titan_objectives.vocabulary``, so it is right on one rank
and under tensor parallelism, where the logits are split over the vocabulary."""

from dataclasses import dataclass

import torch

from titan_objectives import (
    IGNORE_INDEX,
    Features,
    MeanMetric,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    OptionError,
    Requirements,
    vocabulary,
)


@dataclass
class ZLossOptions(ObjectiveOptions):
    coefficient: float = 1e-4
    """Multiplier of log(Z)^2 (PaLM used 1e-4)."""

    def validate(self, model) -> None:
        super().validate(model)
        if self.coefficient <= 0:
            raise OptionError("coefficient", self.coefficient, "a number > 0")


class ZLoss(Objective):
    """coefficient * log(Z)^2 per scored token (PaLM's z-loss)."""

    Options = ZLossOptions
    # Per position, on the logits of this rank's tensor-parallel group (the whole
    # sequence without context parallelism) and the labels of the same positions.
    sequence_parallel = True

    def requirements(self) -> Requirements:
        return Requirements(logits=True)

    def forward(self, features: Features) -> ObjectiveOutput:
        log_z = vocabulary.logsumexp(features.logits)
        valid = features.sequence.in_group(features.labels) != IGNORE_INDEX
        per_token = self.options.coefficient * log_z.square()
        loss_sum = torch.where(valid, per_token, 0.0).sum()
        mean_log_z = MeanMetric(torch.where(valid, log_z, 0.0).sum().detach(), valid.sum())
        return ObjectiveOutput(loss_sum, {"log_z": mean_log_z})
