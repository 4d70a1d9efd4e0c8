"""torchtitan 0.3's validator, scoring the objective stack: every objective's validation
loss and the geometry of the validation hidden states, from the same forward pass.

torchtitan's ``validation_metrics/loss`` becomes the stack's weighted total, as the
training loss is (the model's own loss function is not used by this host)."""

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_objectives.hosts.common.capture import ForwardCapture, HiddenStateTap
from titan_objectives.hosts.common.geometry_probe import GeometryProbe
from titan_objectives.hosts.common.running_metrics import ValidationTotals
from titan_objectives.objective import IGNORE_INDEX
from titan_objectives.sequence import SequenceShards
from titan_objectives.stack import ObjectiveStack


class ObjectiveValidation:
    """Installs itself on a torchtitan ``Validator``: its loss function becomes the stack
    (on the captured hidden states) and ``validate`` logs the objectives' values."""

    def __init__(
        self,
        validator: Any,
        hidden_states: HiddenStateTap,
        stack: ObjectiveStack,
        geometry: GeometryProbe | None,
        mesh: DeviceMesh | None,
        sequence: SequenceShards,
        reads_logits: bool,
        loss_context: Callable[[], contextlib.AbstractContextManager],
    ):
        self.hidden_states, self.stack, self.geometry = hidden_states, stack, geometry
        self.mesh, self.sequence, self.reads_logits = mesh, sequence, reads_logits
        self.loss_context = loss_context
        self._captured: ForwardCapture | None = None
        self._totals = ValidationTotals()
        self._step = 0
        run = validator.validate
        metrics_logger = validator.metrics_processor.logger

        def validate(model_parts: list, step: int) -> None:
            self._totals, self._step, self._sampled = ValidationTotals(), step, False
            with self.hidden_states.capture() as self._captured:
                run(model_parts, step)
            logged = self._totals.reduce(self.mesh)
            if self.geometry is not None:
                geometry = self.geometry.measure(seed=step)
                logged.update({f"validation/geometry/{k}": v for k, v in geometry.items()})
            metrics_logger.log(logged, step)

        validator.validate = validate
        validator.loss_fn = self.loss

    @torch.no_grad()
    def loss(
        self, pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: Any = None, **_: Any
    ) -> tuple[torch.Tensor, dict]:
        captured = self._captured
        if self.geometry is not None and not self._sampled:
            self.geometry.take_sample(
                captured.hidden, seed=self._step, valid=labels != IGNORE_INDEX
            )
            self._sampled = True
        logits = pred if self.reads_logits else None
        with self.loss_context():
            output = self.stack(captured.features(labels, logits, self.sequence))
        self._totals.add(output, labels)
        return output.weighted_loss_sum, {}
