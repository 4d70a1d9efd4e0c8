"""Per-objective numbers (``hosts.common.running_metrics``) in torchtitan 0.2.2's
console line and TensorBoard."""

from typing import Any

from torch.distributed.device_mesh import DeviceMesh
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from titan_objectives.hosts.common.running_metrics import ObjectiveMetrics, console_line


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
            losses = console_line(values)
            logger.info(f"{self.color.green}step: {step:2}  objectives  {losses}{self.color.reset}")


def build_objective_metrics_processor(
    job_config: Any, parallel_dims: Any, model_args: Any = None, tag: str | None = None
) -> ObjectiveMetricsProcessor:
    return ObjectiveMetricsProcessor(job_config, parallel_dims, tag)
