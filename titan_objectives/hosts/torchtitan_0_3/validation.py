"""torchtitan 0.3's validator, scoring the objective stack: every objective's validation
loss and the geometry of the validation hidden states, from the same forward pass.

torchtitan's ``validation_metrics/loss`` becomes the stack's weighted total, as the
training loss is (the model's own loss function is not used by this host)."""

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor.parallel import loss_parallel
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
        self.loss_fn = self.objectives_loss

    def validate(self, model_parts: list, step: int) -> None:
        logger = self.metrics_processor.logger
        with self.runtime.validation(step, logger) as self._score:
            super().validate(model_parts, step)

    @torch.no_grad()
    def objectives_loss(
        self, pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: Any = None, **_: Any
    ) -> tuple[torch.Tensor, dict]:
        """torchtitan 0.3's loss-function signature: (sum, extra metrics)."""
        tensor_parallel = self.parallel_dims.tp_enabled
        with loss_parallel() if tensor_parallel else contextlib.nullcontext():
            output = self._score(pred, labels)
        return output.weighted_loss_sum, {}
