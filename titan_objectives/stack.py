"""The objectives a config names, as one module: the union of what they need, and the
weighted sum of what they return."""

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from titan_objectives.objective import (
    Features,
    ModelInfo,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    Requirements,
)
from titan_objectives.registry import get_objective


@dataclass
class StackOutput:
    weighted_loss_sum: torch.Tensor
    outputs: dict[str, ObjectiveOutput]


class ObjectiveStack(nn.ModuleDict):
    """Objectives by name, in stack order. Attached to the model as ``model.objectives``."""

    def __init__(self, options: dict[str, ObjectiveOptions], model: ModelInfo):
        super().__init__({name: get_objective(name)(opts, model) for name, opts in options.items()})
        self.step = 1

    def objectives(self) -> dict[str, Objective]:
        return {name: cast(Objective, module) for name, module in self.items()}

    def weights(self) -> dict[str, float]:
        """Each objective's weight at the current step (see ``set_step``)."""
        return {name: obj.options.weight_at(self.step) for name, obj in self.objectives().items()}

    def set_step(self, step: int) -> None:
        """The training step the next forward belongs to, for weight schedules."""
        self.step = step

    def requirements(self) -> Requirements:
        merged = Requirements()
        for objective in self.objectives().values():
            merged = merged | objective.requirements()
        return merged

    def init_weights(self) -> None:
        for objective in self.objectives().values():
            objective.init_weights()

    def forward(self, features: Features) -> StackOutput:
        outputs = {
            name: objective(features.restricted_to(objective.requirements()))
            for name, objective in self.objectives().items()
        }
        weights = self.weights()
        weighted = sum(weights[name] * out.loss_sum for name, out in outputs.items())
        return StackOutput(cast(torch.Tensor, weighted), outputs)
