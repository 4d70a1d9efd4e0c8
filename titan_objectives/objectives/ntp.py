"""``ntp``: next-token prediction, with torchtitan's cross-entropy semantics."""

from dataclasses import dataclass

from titan_objectives.losses import cross_entropy_sum, linear_cross_entropy_sum
from titan_objectives.objective import (
    Features,
    ModelInfo,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    OptionError,
    Requirements,
)
from titan_objectives.registry import register_objective


@dataclass
class NTPOptions(ObjectiveOptions):
    chunk_size: int = 0
    """0: cross-entropy of the model's logits (torchtitan's path, bit for bit). N > 0: the
    memory-efficient linear cross-entropy, N tokens at a time; the model then skips its
    full logits."""

    def validate(self, model: ModelInfo) -> None:
        super().validate(model)
        if self.chunk_size < 0:
            raise OptionError("chunk_size", self.chunk_size, "0 (off) or a number of tokens > 0")


@register_objective("ntp")
class NextTokenPrediction(Objective):
    """Cross-entropy of the next token, from the logits or from the final hidden state."""

    Options = NTPOptions
    options: NTPOptions
    # The logits cover the whole sequence on every rank (vocabulary-sharded under loss
    # parallel); the chunked path declares that it needs the whole vocabulary.
    sequence_parallel = True

    def __init__(self, options: NTPOptions, model: ModelInfo):
        super().__init__(options, model)
        self.shared = model.shared

    def requirements(self) -> Requirements:
        if self.options.chunk_size:
            # Chunked: the model skips its logits; this reads the head's whole weight.
            return Requirements(final_hidden=True, output_weight=True, whole_vocabulary=True)
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
            )
        else:
            loss_sum = cross_entropy_sum(features.logits, features.labels)
        return ObjectiveOutput(loss_sum)
