"""torchtitan 0.2.2's validator, with every objective's validation loss and the geometry
of the validation hidden states logged beside torchtitan's own validation loss."""

from typing import Any

import torch
from torchtitan.components.validate import Validator

from titan_objectives.hosts.common.runtime import ObjectiveRuntime


class ObjectiveValidator(Validator):
    """torchtitan's validation loop, unchanged: its loss function also scores each batch
    with the stack, from the same forward pass, and still returns torchtitan's loss."""

    runtime: ObjectiveRuntime | None = None

    def attach(self, runtime: ObjectiveRuntime) -> None:
        self.runtime = runtime

    @property
    def loss_fn(self) -> Any:
        """What torchtitan's loop calls: torchtitan's loss, scoring the stack on the side
        once attached."""
        return self.objectives_loss if self.runtime is not None else self._torchtitan_loss

    @loss_fn.setter
    def loss_fn(self, loss_fn: Any) -> None:
        self._torchtitan_loss = loss_fn

    @torch.no_grad()
    def validate(self, model_parts: list, step: int) -> None:
        logger = self.metrics_processor.logger
        validation = self.runtime.validation(
            step, logger, keep_logits=True, loss=self.objectives_loss
        )
        with validation as self._score:
            super().validate(model_parts, step)

    def objectives_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """torchtitan 0.2.2's loss-function signature."""
        self._score(logits, labels)
        return self._torchtitan_loss(logits, labels)


def build_objective_validator(**kwargs: Any) -> ObjectiveValidator:
    """Same arguments as torchtitan's ``build_validator``."""
    return ObjectiveValidator(**kwargs)
