"""The objectives a config names, as one module: the union of what they need, and the
weighted sum of what they return."""

import dataclasses
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from titan_objectives.config import SECTION, ObjectivesConfigError, StackEntry
from titan_objectives.objective import (
    Features,
    ModelInfo,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    Requirements,
)


@dataclass
class StackOutput:
    weighted_loss_sum: torch.Tensor
    outputs: dict[str, ObjectiveOutput]


class ObjectiveStack(nn.ModuleDict):
    """Objectives by name, in stack order. Attached to the model as ``model.objectives``."""

    def __init__(self, objectives: dict[str, Objective]):
        super().__init__(objectives)
        self.step = 1

    @classmethod
    def build(cls, entries: dict[str, StackEntry], model: ModelInfo, model_name: str):
        """Each objective built once, on the current device (the meta device, before the
        model exists), for the model ``model_name`` names in messages. An objective that
        cannot be built for this model is a config error naming it."""
        objectives = {}
        for name, entry in entries.items():
            try:
                objectives[name] = entry.cls(entry.options, model)
            except Exception as error:  # noqa: BLE001 - any failure means it cannot be built
                raise ObjectivesConfigError(
                    f"{SECTION}.stack has {name!r}{settings(entry.options)}, which cannot be "
                    f"built for {model_name}: {type(error).__name__}: {str(error)[:300]}; "
                    "remove it from the stack"
                ) from None
        return cls(objectives)

    def objectives(self) -> dict[str, Objective]:
        return {name: cast(Objective, module) for name, module in self.items()}

    def weights(self) -> dict[str, float]:
        """Each objective's weight at the current step (see ``set_step``)."""
        return {name: obj.options.weight_at(self.step) for name, obj in self.objectives().items()}

    def set_step(self, step: int) -> None:
        """The training step the next forward belongs to, for weight schedules."""
        self.step = step

    def options(self) -> dict[str, ObjectiveOptions]:
        return {name: obj.options for name, obj in self.objectives().items()}

    def declarations(self) -> dict[str, Requirements]:
        """What each objective declares."""
        return {name: obj.requirements() for name, obj in self.objectives().items()}

    def requirements(self) -> Requirements:
        """The union of what the objectives declare."""
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


def settings(options: ObjectiveOptions) -> str:
    """The options a user set (those that differ from the defaults), for messages."""
    defaults = type(options)()
    changed = [
        f"{f.name} = {getattr(options, f.name)!r}"
        for f in dataclasses.fields(options)
        if getattr(options, f.name) != getattr(defaults, f.name)
    ]
    return f" ({', '.join(changed)})" if changed else ""
