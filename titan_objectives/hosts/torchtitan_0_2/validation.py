"""torchtitan's validator, with every objective's validation loss and the geometry of
the validation hidden states logged beside torchtitan's own validation loss."""

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.components.validate import Validator

from titan_objectives.hosts.common.capture import HiddenStateTap
from titan_objectives.hosts.common.geometry_probe import GeometryProbe
from titan_objectives.hosts.common.running_metrics import ValidationTotals
from titan_objectives.objective import IGNORE_INDEX
from titan_objectives.sequence import SequenceShards
from titan_objectives.stack import ObjectiveStack


class ObjectiveValidator(Validator):
    """Runs torchtitan's validation loop unchanged; its loss function is wrapped so that
    each batch also goes through the objective stack, from the same forward pass."""

    def attach(
        self,
        hidden_states: HiddenStateTap,
        stack: ObjectiveStack,
        geometry: GeometryProbe | None,
        mesh: DeviceMesh | None,
        sequence: SequenceShards,
    ) -> None:
        self.hidden_states, self.stack, self.geometry, self.mesh, self.sequence = (
            hidden_states, stack, geometry, mesh, sequence,
        )  # fmt: skip

    @torch.no_grad()
    def validate(self, model_parts: list, step: int) -> None:
        totals = ValidationTotals()
        loss_fn = self.loss_fn
        first_batch = True

        def loss_with_objectives(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            nonlocal first_batch
            if self.geometry is not None and first_batch:
                valid = labels != IGNORE_INDEX
                self.geometry.take_sample(captured.hidden, seed=step, valid=valid)
            first_batch = False
            totals.add(self.stack(captured.features(labels, logits, self.sequence)), labels)
            return loss_fn(logits, labels)

        self.loss_fn = loss_with_objectives
        try:
            with self.hidden_states.capture(keep_logits=True) as captured:
                super().validate(model_parts, step)
        finally:
            self.loss_fn = loss_fn
        logged = totals.reduce(self.mesh)
        if self.geometry is not None:
            geometry = self.geometry.measure(seed=step)
            logged.update({f"validation/geometry/{k}": v for k, v in geometry.items()})
        self.metrics_processor.logger.log(logged, step)


def build_objective_validator(**kwargs: Any) -> ObjectiveValidator:
    """Same arguments as torchtitan's ``build_validator``."""
    return ObjectiveValidator(**kwargs)
