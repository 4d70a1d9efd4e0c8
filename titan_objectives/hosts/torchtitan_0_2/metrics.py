"""Per-objective numbers (``hosts.common.running_metrics``) in torchtitan 0.2.2's
console line and TensorBoard."""

from typing import Any

from torch.distributed.device_mesh import DeviceMesh
from torchtitan.components.metrics import MetricsProcessor

from titan_objectives.hosts.common.running_metrics import ObjectiveMetrics, log_step


class ObjectiveMetricsProcessor(MetricsProcessor):
    """torchtitan's processor, plus the objectives' values on the logging steps."""

    objective_metrics: ObjectiveMetrics | None = None
    objective_mesh: DeviceMesh | None = None

    def log(self, step: int, *args: Any, **kwargs: Any) -> None:
        """torchtitan's ``log(step, global_avg_loss, global_max_loss, grad_norm,
        extra_metrics)``, spelled out once in ``log_step``."""
        values = (
            self.objective_metrics.reduce(self.objective_mesh) if self.objective_metrics else {}
        )
        log_step(super().log, values, self.color, step, *args, **kwargs)


def build_objective_metrics_processor(
    job_config: Any, parallel_dims: Any, model_args: Any = None, tag: str | None = None
) -> ObjectiveMetricsProcessor:
    return ObjectiveMetricsProcessor(job_config, parallel_dims, tag)
