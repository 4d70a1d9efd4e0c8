from dataclasses import dataclass

import torch

from titan_objectives import (
    IGNORE_INDEX,
    Features,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    Requirements,
)


@dataclass
class HiddenRMSOptions(ObjectiveOptions):
    target_rms: float = 1.0
    """RMS each final hidden state is pulled towards."""


class HiddenRMS(Objective):
    """(rms(h_t) - target)^2 for every scored position."""

    Options = HiddenRMSOptions

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True)

    def forward(self, features: Features) -> ObjectiveOutput:
        rms = features.final_hidden.float().pow(2).mean(-1).sqrt()
        per_token = (rms - self.options.target_rms) ** 2
        valid = features.labels != IGNORE_INDEX
        return ObjectiveOutput(torch.where(valid, per_token, 0.0).sum())


class NotAnObjective:
    pass


class NaNProbe(Objective):
    """A loss that is always NaN: to test what training does with one."""

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True)

    def forward(self, features: Features) -> ObjectiveOutput:
        return ObjectiveOutput(features.final_hidden.float().sum() * float("nan"))
