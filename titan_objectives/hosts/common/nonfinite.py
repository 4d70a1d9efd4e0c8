"""Keeping a NaN or inf objective loss out of the weights, without a host sync per step.

Each micro-batch ORs "this objective's loss is not finite" into a flag vector on the
device. Before the optimizer steps, the flags are max-reduced over the data-parallel
ranks (every rank must decide alike; a tiny all-reduce, no host involvement) and handed
to the fused Adam/AdamW kernels as ``found_inf``, the input ``GradScaler`` uses: when set,
the kernels leave parameters, moments and step counts untouched, decided on the device.
The host learns of it at the next logging step, when torchtitan reads its metrics anyway:
``error`` then stops training, naming the objectives and the first bad step; ``skip``
warns and goes on.

Optimizers other than the fused ones cannot skip on the device: with them the flags are
read before every step (one device-to-host sync), the only way to skip or stop in time.
"""

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """An objective's loss was NaN or inf; the optimizer did not apply that step."""


class NonFiniteGuard:
    def __init__(
        self,
        names: list[str],
        policy: str,
        optimizers: Any,
        mesh: DeviceMesh | dist.ProcessGroup | None,
        device: torch.device,
    ):
        """``mesh``: the ranks whose flags decide together (None: this rank alone)."""
        self.names, self.policy, self.mesh = names, policy, mesh
        self._optimizers = optimizers.optimizers
        # Fused per parameter group (torchtitan 0.3 sets it there, 0.2.2 in the defaults
        # every group inherits).
        self.on_device = all(
            group.get("fused") for opt in self._optimizers for group in opt.param_groups
        )
        self._flags = torch.zeros(len(names), dtype=torch.bool, device=device)
        # Since the last report: how many steps each objective was not finite, and the
        # first such step (0: none).
        self._bad_steps = torch.zeros(len(names), dtype=torch.int64, device=device)
        self._any_bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._first_bad_step = torch.zeros((), dtype=torch.int64, device=device)
        self._step = 0
        self._step_skipped = torch.zeros((), dtype=torch.bool)
        if not isinstance(optimizers, GuardedOptimizers):
            raise TypeError(
                f"{type(optimizers).__name__} is not a GuardedOptimizers: the host extends "
                "its optimizers container with it (see its seams module)"
            )
        optimizers.nonfinite_guard = self

    def start_step(self, step: int) -> None:
        self._step = step
        self._flags.zero_()
        self._step_skipped = torch.zeros((), dtype=torch.bool)

    def step_skipped(self) -> bool:
        """Whether the current step's optimizer step was skipped (reads the device)."""
        return bool(self._step_skipped)

    def record(self, loss_sums: list[torch.Tensor]) -> None:
        """One micro-batch's loss sums, in ``names`` order."""
        self._flags |= ~torch.isfinite(torch.stack([loss.detach() for loss in loss_sums]))

    def guarded_step(self, apply_step: Any, *args: Any, **kwargs: Any) -> Any:
        flags = self._flags
        if self.mesh is not None:
            flags = funcol.all_reduce(flags.to(torch.float32), "max", self.mesh).bool()
        any_bad = flags.any()
        self._step_skipped = any_bad
        self._bad_steps += flags.long()
        self._any_bad_steps += any_bad.long()
        self._first_bad_step = torch.where(
            (self._first_bad_step == 0) & any_bad, self._step, self._first_bad_step
        )
        if not self.on_device:
            if bool(any_bad):  # host sync: non-fused optimizers cannot skip by themselves
                self.report()
                return None
            return apply_step(*args, **kwargs)
        found_inf = any_bad.to(torch.float32)
        for optimizer in self._optimizers:
            optimizer.found_inf = found_inf
        return apply_step(*args, **kwargs)

    def report(self) -> bool:
        """Tell of the non-finite steps since the last report (reads the device): stop
        under ``error``, warn under ``skip``. Call at logging steps and at the end.
        Returns whether there were any."""
        *counts, total, first = torch.cat(
            [self._bad_steps, self._any_bad_steps.view(1), self._first_bad_step.view(1)]
        ).tolist()  # one read
        if not total:
            return False
        for tensor in (self._bad_steps, self._any_bad_steps, self._first_bad_step):
            tensor.zero_()
        bad = [name for name, count in zip(self.names, counts, strict=True) if count]
        what = f"step {first}: the loss of {', '.join(bad)} is not finite (NaN or inf)"
        more = total - 1
        if more:
            what += f", and at {more} more step(s) up to step {self._step}"
        if self.policy == "skip":
            logger.warning(f"{what}; the optimizer skipped those steps")
            return True
        raise NonFiniteLossError(
            f"{what}; the optimizer did not apply it, and training stopped at step "
            f"{self._step}. Set [objectives] nonfinite = 'skip' (or --objectives.nonfinite "
            "skip) to skip such steps and go on"
        )


class GuardedOptimizers:
    """Mixin for a torchtitan optimizers container: once a ``NonFiniteGuard`` is set, its
    step goes through the guard."""

    nonfinite_guard: NonFiniteGuard | None = None

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if self.nonfinite_guard is None:
            return super().step(*args, **kwargs)
        return self.nonfinite_guard.guarded_step(super().step, *args, **kwargs)
