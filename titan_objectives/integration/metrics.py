"""Per-objective numbers in torchtitan's console line and TensorBoard.

During a step the values stay on the device as running sums; only on logging steps are
they reduced across data-parallel ranks (one all-reduce for all of them) and read back,
so steps that do not log gain no host synchronisation.
"""

from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from titan_objectives.stack import StackOutput

PREFIX = "objectives"


class ObjectiveMetrics:
    """Running sums of one optimizer step (over its gradient-accumulation micro-batches)."""

    def __init__(self, weights: dict[str, float]):
        self.weights = weights
        self._sums: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self._sums = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def add(self, output: StackOutput, global_valid_tokens: torch.Tensor) -> None:
        for name, out in output.outputs.items():
            self._add(f"{name}/loss", out.loss_sum / global_valid_tokens)
            for metric, mean in out.metrics.items():
                self._add(f"{name}/{metric}:total", mean.total)
                self._add(f"{name}/{metric}:count", mean.count)

    def reduce(self, mesh: DeviceMesh | None) -> dict[str, float]:
        """Global values of this step, keyed for TensorBoard. Reads the device once."""
        if not self._sums:
            return {}
        keys = list(self._sums)
        vector = torch.stack([self._sums[k] for k in keys])
        if mesh is not None:
            vector = funcol.all_reduce(vector, reduceOp="sum", group=mesh)
        values = dict(zip(keys, vector.tolist(), strict=True))

        logged: dict[str, float] = {}
        total = 0.0
        for name, weight in self.weights.items():
            loss = values[f"{name}/loss"]
            logged[f"{PREFIX}/{name}/loss"] = loss
            logged[f"{PREFIX}/{name}/weight"] = weight
            total += weight * loss
        for key, value in values.items():
            if key.endswith(":total"):
                base = key.removesuffix(":total")
                logged[f"{PREFIX}/{base}"] = value / max(values[f"{base}:count"], 1.0)
        logged[f"{PREFIX}/total/loss"] = total
        return logged


class ObjectiveMetricsProcessor(MetricsProcessor):
    """torchtitan's processor, plus the objectives' values on the logging steps."""

    objective_metrics: ObjectiveMetrics | None = None
    objective_mesh: DeviceMesh | None = None

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        values = (
            self.objective_metrics.reduce(self.objective_mesh) if self.objective_metrics else {}
        )
        super().log(
            step, global_avg_loss, global_max_loss, grad_norm, {**(extra_metrics or {}), **values}
        )
        if values:
            losses = "  ".join(
                f"{key.split('/')[1]}: {value:8.5f}"
                for key, value in values.items()
                if key.endswith("/loss") and not key.startswith(f"{PREFIX}/total/")
            )
            logger.info(f"{self.color.green}step: {step:2}  objectives  {losses}{self.color.reset}")


def build_objective_metrics_processor(
    job_config: Any, parallel_dims: Any, model_args: Any = None, tag: str | None = None
) -> ObjectiveMetricsProcessor:
    return ObjectiveMetricsProcessor(job_config, parallel_dims, tag)
