"""torchtitan's validator, with every objective's validation loss and the geometry of
the validation hidden states logged beside torchtitan's own validation loss."""

from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.components.validate import Validator

from titan_objectives.integration.geometry import GeometryProbe
from titan_objectives.integration.model_adapter import HiddenStateTap
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
        sums: dict[str, torch.Tensor] = {}
        loss_fn = self.loss_fn

        def loss_with_objectives(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if self.geometry is not None and not sums:
                valid = labels != IGNORE_INDEX
                self.geometry.take_sample(captured.hidden, seed=step, valid=valid)
            output = self.stack(captured.features(labels, logits, self.sequence))
            tokens = (labels != IGNORE_INDEX).sum().float()
            for name, out in output.outputs.items():
                for key, value in ((f"{name}/loss", out.loss_sum), (f"{name}/tokens", tokens)):
                    sums[key] = sums.get(key, 0) + value.float()
            return loss_fn(logits, labels)

        self.loss_fn = loss_with_objectives
        try:
            with self.hidden_states.capture(keep_logits=True) as captured:
                super().validate(model_parts, step)
        finally:
            self.loss_fn = loss_fn
        self.metrics_processor.logger.log(self._reduce(sums, step), step)

    def _reduce(self, sums: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        keys = list(sums)
        vector = torch.stack([sums[k] for k in keys])
        if self.mesh is not None:
            vector = funcol.all_reduce(vector, reduceOp="sum", group=self.mesh)
        totals = dict(zip(keys, vector.tolist(), strict=True))
        logged = {
            f"validation/objectives/{key.removesuffix('/loss')}/loss": value
            / max(totals[key.replace("/loss", "/tokens")], 1.0)
            for key, value in totals.items()
            if key.endswith("/loss")
        }
        if self.geometry is not None:
            geometry = self.geometry.measure(seed=step)
            logged.update({f"validation/geometry/{k}": v for k, v in geometry.items()})
        return logged


def build_objective_validator(**kwargs: Any) -> ObjectiveValidator:
    """Same arguments as torchtitan's ``build_validator``."""
    return ObjectiveValidator(**kwargs)
