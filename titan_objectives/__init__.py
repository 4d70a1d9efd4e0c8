"""Composable loss objectives for torchtitan: ``stack = ["ntp", "nitp"]`` in a job config."""

from titan_objectives import (
    losses,  # the head's cross-entropy, chunked: for objectives with a vocabulary-sized head
    vocabulary,  # helpers for objectives that read logits
)
from titan_objectives.objective import (
    IGNORE_INDEX,
    Features,
    MeanMetric,
    ModelInfo,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    OptionError,
    Requirements,
)
from titan_objectives.registry import (
    get_objective,
    list_objectives,
    register_objective,
)
from titan_objectives.sequence import SequenceShards
from titan_objectives.stack import ObjectiveStack

__all__ = [
    "IGNORE_INDEX",
    "Features",
    "MeanMetric",
    "ModelInfo",
    "Objective",
    "ObjectiveOptions",
    "ObjectiveOutput",
    "ObjectiveStack",
    "OptionError",
    "Requirements",
    "SequenceShards",
    "get_objective",
    "losses",
    "list_objectives",
    "register_objective",
    "vocabulary",
]
