"""torchtitan 0.2.2's validator, with every objective's validation loss and the geometry
of the validation hidden states logged beside torchtitan's own validation loss."""

from typing import Any

import torch
from torchtitan.components.validate import Validator

from titan_objectives.hosts.common.runtime import ObjectiveRuntime


class ObjectiveValidator(Validator):
    """Runs torchtitan's validation loop unchanged; each batch also goes through the
    objective stack, from the same forward pass (its loss function scores both)."""

    runtime: ObjectiveRuntime | None = None

    def attach(self, runtime: ObjectiveRuntime) -> None:
        self.runtime = runtime

    @torch.no_grad()
    def validate(self, model_parts: list, step: int) -> None:
        logger = self.metrics_processor.logger
        loss_fn = self.loss_fn
        with self.runtime.validation(step, logger, keep_logits=True) as score:

            def loss_with_objectives(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                score(logits, labels)
                return loss_fn(logits, labels)

            self.loss_fn = loss_with_objectives
            try:
                super().validate(model_parts, step)
            finally:
                self.loss_fn = loss_fn


def build_objective_validator(**kwargs: Any) -> ObjectiveValidator:
    """Same arguments as torchtitan's ``build_validator``."""
    return ObjectiveValidator(**kwargs)
