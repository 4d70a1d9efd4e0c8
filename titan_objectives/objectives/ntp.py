"""``ntp``: next-token prediction, with torchtitan's cross-entropy semantics."""

from dataclasses import dataclass

from titan_objectives.losses import (
    CrossEntropyOptions,
    cross_entropy_sum,
    linear_cross_entropy_sum,
)
from titan_objectives.objective import (
    Features,
    ModelInfo,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    Requirements,
)


@dataclass
class NTPOptions(CrossEntropyOptions, ObjectiveOptions):
    def validate(self, model: ModelInfo) -> None:
        super().validate(model)
        self.validate_cross_entropy()


class NextTokenPrediction(Objective):
    """Cross-entropy of the next token, from the logits or from the final hidden state."""

    Options = NTPOptions
    options: NTPOptions
    # The logits cover the whole sequence on every rank (vocabulary-sharded under loss
    # parallel); the chunked path splits its head like the model's under TP.
    sequence_parallel = True

    def __init__(self, options: NTPOptions, model: ModelInfo):
        super().__init__(options, model)
        self.shared = model.shared

    def requirements(self) -> Requirements:
        if self.options.chunk_size:
            # Chunked: the model skips its logits; this reads the head's weight. Only
            # PyTorch's kernel needs the whole vocabulary on one rank.
            return Requirements(
                final_hidden=True,
                output_weight=True,
                whole_vocabulary=self.options.ce_backend == "torch",
            )
        return Requirements(logits=True)

    def flops_per_token(self) -> int:
        return 0  # the model's own head: already in the model's count

    def forward(self, features: Features) -> ObjectiveOutput:
        if self.options.chunk_size:
            loss_sum = linear_cross_entropy_sum(
                features.final_hidden,
                self.shared.output_weight(),
                features.labels,
                self.options.chunk_size,
                self.options.ce_backend,
                features.sequence,
            )
        else:
            # The logits hold the positions of this rank's tensor-parallel group.
            labels = features.sequence.in_group(features.labels)
            loss_sum = cross_entropy_sum(features.logits, labels)
        return ObjectiveOutput(loss_sum)
