"""Per-objective numbers (``hosts.common.running_metrics``) in torchtitan 0.2.2's
console line and TensorBoard."""

from typing import Any

from torchtitan.components.metrics import MetricsProcessor

from titan_objectives.hosts.common.running_metrics import ObjectiveMetricsLogging


class ObjectiveMetricsProcessor(ObjectiveMetricsLogging, MetricsProcessor):
    """torchtitan's processor, plus the objectives' values on the logging steps."""


def build_objective_metrics_processor(
    job_config: Any, parallel_dims: Any, model_args: Any = None, tag: str | None = None
) -> ObjectiveMetricsProcessor:
    """Same arguments as torchtitan's ``build_metrics_processor``."""
    return ObjectiveMetricsProcessor(job_config, parallel_dims, tag)
