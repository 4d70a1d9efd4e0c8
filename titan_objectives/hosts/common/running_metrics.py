"""Per-objective numbers of a training step, kept on the device.

During a step the values stay on the device as running sums; only on logging steps are
they reduced across data-parallel ranks (one all-reduce for all of them) and read back,
so steps that do not log gain no host synchronisation.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from titan_objectives.objective import IGNORE_INDEX
from titan_objectives.stack import StackOutput

PREFIX = "objectives"
logger = logging.getLogger(__name__)


def summed_over_ranks(sums: dict[Any, torch.Tensor], mesh: DeviceMesh | None) -> dict[Any, float]:
    """Scalars on the device, summed over ``mesh`` in one all-reduce and read at once."""
    keys = list(sums)
    vector = torch.stack([sums[k] for k in keys])
    if mesh is not None:
        vector = funcol.all_reduce(vector, reduceOp="sum", group=mesh)
    return dict(zip(keys, vector.tolist(), strict=True))


def _accumulate(sums: dict[Any, torch.Tensor], key: Any, value: torch.Tensor) -> None:
    value = value.detach().float()
    sums[key] = sums[key] + value if key in sums else value


@dataclass
class StepMetrics:
    """One step's objective values over all ranks: ``logged`` keyed for TensorBoard,
    ``losses`` by objective for the console."""

    logged: dict[str, float] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)


class ObjectiveMetrics:
    """Running sums of one optimizer step (over its gradient-accumulation micro-batches),
    keyed by (objective, metric); a metric's key holds its (total, count)."""

    LOSS = "loss"

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self._sums: dict[tuple[str, str, int], torch.Tensor] = {}

    def reset(self, weights: dict[str, float]) -> None:
        """A new step, whose objectives carry ``weights``."""
        self.weights = weights
        self._sums = {}

    def add(self, output: StackOutput, global_valid_tokens: torch.Tensor) -> None:
        for name, out in output.outputs.items():
            _accumulate(self._sums, (name, self.LOSS, 0), out.loss_sum / global_valid_tokens)
            for metric, mean in out.metrics.items():
                _accumulate(self._sums, (name, metric, 0), mean.total)
                _accumulate(self._sums, (name, metric, 1), mean.count)

    def reduce(self, mesh: DeviceMesh | None) -> StepMetrics:
        """Global values of this step. Reads the device once."""
        if not self._sums:
            return StepMetrics()
        values = summed_over_ranks(self._sums, mesh)
        logged: dict[str, float] = {}
        losses = {name: values[(name, self.LOSS, 0)] for name in self.weights}
        total = 0.0
        for name, weight in self.weights.items():
            loss = losses[name]
            logged[f"{PREFIX}/{name}/loss"] = loss
            logged[f"{PREFIX}/{name}/weight"] = weight
            total += weight * loss
        for (name, metric, part), value in values.items():
            if metric != self.LOSS and part == 0:
                count = values[(name, metric, 1)]
                logged[f"{PREFIX}/{name}/{metric}"] = value / max(count, 1.0)
        logged[f"{PREFIX}/total/loss"] = total
        return StepMetrics(logged, losses)


class ValidationTotals:
    """Each objective's loss over a validation pass: sums of loss and labelled tokens,
    on the device, reduced over the data-parallel ranks once at the end."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, output: StackOutput, labels: torch.Tensor) -> None:
        tokens = (labels != IGNORE_INDEX).sum()
        for name, out in output.outputs.items():
            _accumulate(self._sums, (name, "loss"), out.loss_sum)
            _accumulate(self._sums, (name, "tokens"), tokens)

    def reduce(self, mesh: DeviceMesh | None) -> dict[str, float]:
        """``validation/objectives/<name>/loss`` of the pass (reads the device once)."""
        if not self._sums:
            return {}
        totals = summed_over_ranks(self._sums, mesh)
        return {
            f"validation/{PREFIX}/{name}/loss": value / max(totals[(name, "tokens")], 1.0)
            for (name, part), value in totals.items()
            if part == "loss"
        }


def log_step(
    log: Callable[..., None],
    metrics: StepMetrics,
    color: Any,
    step: int,
    global_avg_loss: float,
    global_max_loss: float,
    grad_norm: float,
    extra_metrics: dict[str, Any] | None = None,
) -> None:
    """A torchtitan metrics processor's ``log`` (both releases share its signature) with
    the objectives' values added to TensorBoard and a console line of their losses."""
    extra = {**(extra_metrics or {}), **metrics.logged}
    log(step, global_avg_loss, global_max_loss, grad_norm, extra)
    if metrics.losses:
        losses = "  ".join(f"{name}: {loss:8.5f}" for name, loss in metrics.losses.items())
        logger.info(f"{color.green}step: {step:2}  objectives  {losses}{color.reset}")


class ObjectiveMetricsLogging:
    """Mixin for a torchtitan ``MetricsProcessor``: once ``objective_values`` is set (the
    runtime's reduced metrics), ``log`` adds them to TensorBoard and the console."""

    objective_values: Callable[[], StepMetrics] | None = None

    def log(self, step: int, *args: Any, **kwargs: Any) -> None:
        metrics = self.objective_values() if self.objective_values is not None else StepMetrics()
        log_step(super().log, metrics, self.color, step, *args, **kwargs)
