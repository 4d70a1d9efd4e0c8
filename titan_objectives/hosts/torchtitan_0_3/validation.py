"""torchtitan 0.3's validator, scoring the objective stack: every objective's validation
loss and the geometry of the validation hidden states, from the same forward pass.

torchtitan's ``validation_metrics/loss`` becomes the stack's weighted total, as the
training loss is (the model's own loss function is not used by this host)."""

from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.validate import Validator

from titan_objectives.hosts.common.runtime import ObjectiveRuntime


class ObjectiveValidator(Validator):
    """torchtitan's validation loop, with the stack as its loss function."""

    @dataclass(kw_only=True, slots=True)
    class Config(Validator.Config):
        pass

    runtime: ObjectiveRuntime | None = None

    def attach(self, runtime: ObjectiveRuntime) -> None:
        self.runtime = runtime

    @property
    def loss_fn(self) -> Any:
        """What torchtitan's loop calls: the stack, once attached."""
        return self.objectives_loss if self.runtime is not None else self._torchtitan_loss

    @loss_fn.setter
    def loss_fn(self, loss_fn: Any) -> None:
        self._torchtitan_loss = loss_fn

    def validate(self, model_parts: list, step: int) -> None:
        logger = self.metrics_processor.logger
        # Under pipeline parallelism the schedule's loss function is the runtime's, which
        # hands validation micro-batches to this one.
        loss = lambda pred, labels: self.objectives_loss(pred, labels)[0]  # noqa: E731
        with self.runtime.validation(step, logger, loss=loss) as self._score:
            super().validate(model_parts, step)

    @torch.no_grad()
    def objectives_loss(
        self, pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: Any = None, **_: Any
    ) -> tuple[torch.Tensor, dict]:
        """torchtitan 0.3's loss-function signature: (sum, extra metrics)."""
        return self._score(pred, labels).weighted_loss_sum, {}
