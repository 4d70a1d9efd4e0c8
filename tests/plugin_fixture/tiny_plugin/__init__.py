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
from titan_objectives.losses import cross_entropy_sum
from titan_objectives.sequence import shift_left


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


class ForgetsShardSum(HiddenRMS):
    """HiddenRMS that claims to be right on sequence shards but sums only its own: under
    tensor parallelism each rank's loss misses the other shards' positions (the bug
    ``titan-objectives check-parallel`` is there to catch)."""

    sequence_parallel = True

    def tensor_parallel_plan(self) -> dict:
        return {}

    def forward(self, features: Features) -> ObjectiveOutput:
        rms = features.final_hidden.float().pow(2).mean(-1).sqrt()
        per_token = (rms - self.options.target_rms) ** 2
        valid = features.sequence.local(features.labels != IGNORE_INDEX)
        return ObjectiveOutput(torch.where(valid, per_token, 0.0).sum())  # no sequence.sum


class NotAnObjective:
    pass


@dataclass
class NaNProbeOptions(ObjectiveOptions):
    at_call: int = 0
    """0: NaN at every call; N: NaN at the N-th call only (0 otherwise)."""


class NaNProbe(Objective):
    """A loss that is NaN when told: to test what training does with one."""

    Options = NaNProbeOptions

    def __init__(self, options: NaNProbeOptions, model):
        super().__init__(options, model)
        self.calls = 0

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True)

    def forward(self, features: Features) -> ObjectiveOutput:
        self.calls += 1
        scale = float("nan") if self.options.at_call in (0, self.calls) else 0.0
        return ObjectiveOutput(features.final_hidden.float().sum() * scale)


class ThirdToken(Objective):
    """Cross-entropy of ``labels[:, t + 3]`` (the token at t + 4) from h_t, through the
    model's shared output head: it reads 3 positions ahead and the head's weight, as MTP
    with depth 3 does, under another name."""

    sequence_parallel = True

    def __init__(self, options: ObjectiveOptions, model):
        super().__init__(options, model)
        self.shared = model.shared

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True, lookahead=3, output_weight=True)

    def forward(self, features: Features) -> ObjectiveOutput:
        labels = shift_left(features.labels, 3, IGNORE_INDEX)
        labels = labels.masked_fill(~features.within_document(3), IGNORE_INDEX)
        logits = self.shared.logits(features.final_hidden)  # the group's positions
        return ObjectiveOutput(cross_entropy_sum(logits, features.sequence.in_group(labels)))


class TwoAheadHidden(Objective):
    """Pulls h_t towards the stop-gradient h_{t + 2} of the same document: it reads hidden
    states 2 positions ahead (``hidden_lookahead``), through ``features.sequence``."""

    sequence_parallel = True

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True, lookahead=2, hidden_lookahead=2)

    def forward(self, features: Features) -> ObjectiveOutput:
        sequence, hidden = features.sequence, features.final_hidden.float()
        ahead = sequence.shift_left(hidden.detach(), 2, 0.0)
        valid = sequence.local((features.labels != IGNORE_INDEX) & features.within_document(2))
        per_token = (hidden - ahead).pow(2).mean(-1)
        return ObjectiveOutput(sequence.sum(torch.where(valid, per_token, 0.0).sum()))


@dataclass
class EarlyExitOptions(ObjectiveOptions):
    layer: int = 1
    """The block whose output predicts the next token (as the paper numbers layers)."""


class EarlyExit(Objective):
    """Cross-entropy of the next token from block ``layer``'s output, through the model's
    shared output head: it reads a middle layer (and trains it) and the head's weight."""

    Options = EarlyExitOptions
    sequence_parallel = True

    def __init__(self, options: ObjectiveOptions, model):
        super().__init__(options, model)
        self.shared = model.shared

    def requirements(self) -> Requirements:
        return Requirements(layers=frozenset({self.options.layer}), output_weight=True)

    def forward(self, features: Features) -> ObjectiveOutput:
        logits = self.shared.logits(features.layers[self.options.layer])
        labels = features.sequence.in_group(features.labels)
        return ObjectiveOutput(cross_entropy_sum(logits, labels))
