"""Checkpoint state with objective modules in it, for every host.

A host's DCP checkpoints hold the whole model, objectives' modules and their optimizer
state included, so a resumed run continues exactly. What is added here:

- ``reconcile`` fits a checkpoint to the current stack before DCP reads it: modules of
  an objective the checkpoint lacks keep their initialization (logged), saved state of an
  objective no longer in the stack is ignored (with a warning), and a module or model
  tensor whose shape differs is a clear error naming it, before anything is read;
- ``without_objectives`` is the model state the model-only saves (the shipped model)
  write: the plain model.
"""

import logging
from collections.abc import Callable
from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)

# The keys of the model and the optimizer in both hosts' checkpoint states.
MODEL, OPTIMIZER = "model", "optimizer"

PREFIX = "objectives."


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model and objectives this config builds."""


def objective_of(key: str) -> str | None:
    """``objectives.nitp.projector.w1.weight`` (or an optimizer key holding it) -> nitp."""
    at = key.find(PREFIX)
    return key[at + len(PREFIX) :].split(".", 1)[0] if at >= 0 else None


class _WithoutKeys(Stateful):
    """A Stateful that hides some keys from a checkpoint load, keeping their current
    values, and hands the rest to the wrapped one."""

    def __init__(self, inner: Stateful, hidden: Callable[[str], bool]):
        self.inner, self.hidden = inner, hidden
        self._kept: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        state = self.inner.state_dict()
        self._kept = {k: v for k, v in state.items() if self.hidden(k)}
        return {k: v for k, v in state.items() if not self.hidden(k)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict({**state_dict, **self._kept})


def _check_resumable(states: dict[str, Any], saved: Any, checkpoint_id: str) -> None:
    """A resume asks for the training state (optimizer, data loader, step) besides the
    model; a model-only save has none of it, and DCP would fail on its first missing key
    (``dataloader.dp_rank_0``) without saying why."""
    training_state = [key for key, value in states.items() if isinstance(value, Stateful)]
    if training_state and not any(k.startswith(tuple(training_state)) for k in saved):
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint_id} holds the model only, not the optimizer, data loader "
            "and step a resume needs: it is the model-only save at the last step of a run "
            "with checkpoint.last_save_model_only = true (torchtitan's default). To extend a "
            "run past its last step, save complete checkpoints at the end "
            "(--checkpoint.no-last_save_model_only, or last_save_model_only = false in "
            "[checkpoint]); to go on from this model alone, start a new run from it with "
            "--checkpoint.initial_load_path and --checkpoint.initial_load_model_only in "
            "an empty checkpoint folder"
        )


def reconcile(states: dict[str, Any], checkpoint_id: str) -> dict[str, Any]:
    """The states to load from ``checkpoint_id``, fitted to what it holds."""
    saved = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    _check_resumable(states, saved, checkpoint_id)
    saved_objectives = {objective_of(k) for k in saved} - {None}
    wanted_objectives = {objective_of(k) for k in states} - {None}

    for key, value in states.items():
        if not hasattr(value, "shape"):
            continue
        name = objective_of(key)
        if key not in saved:
            if name is None:
                raise CheckpointMismatchError(
                    f"checkpoint {checkpoint_id} has no {key!r}: it was written for another "
                    "model or flavor than this config builds"
                )
            if name in saved_objectives:
                raise CheckpointMismatchError(
                    f"checkpoint {checkpoint_id}: objective {name!r} has no module {key!r} "
                    "there (were its options changed?)"
                )
            continue
        stored = saved[key]
        if isinstance(stored, TensorStorageMetadata) and tuple(stored.size) != tuple(value.shape):
            what = f"objective {name!r} module {key!r}" if name else f"model tensor {key!r}"
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint_id}: {what} has shape {tuple(stored.size)} there and "
                f"{tuple(value.shape)} in this config"
                + (" (were its options changed?)" if name else " (another flavor?)")
            )

    new = sorted(n for n in wanted_objectives - saved_objectives)
    gone = sorted(saved_objectives - wanted_objectives)
    if gone:
        logger.warning(
            f"checkpoint {checkpoint_id} holds state for objective(s) {', '.join(gone)}, "
            "which the stack no longer has: ignored"
        )
    if not new:
        return states
    logger.info(
        f"checkpoint {checkpoint_id} has no state for objective(s) {', '.join(new)}: "
        "their modules keep their fresh initialization; everything else is resumed"
    )
    is_new = lambda key: objective_of(key) in new  # noqa: E731
    fitted = {k: v for k, v in states.items() if not is_new(k)}
    if OPTIMIZER in fitted:
        fitted[OPTIMIZER] = _WithoutKeys(fitted[OPTIMIZER], is_new)
    return fitted


def without_objectives(wrapper: Stateful) -> Stateful:
    class ModelWithoutObjectives(Stateful):
        def state_dict(self) -> dict[str, Any]:
            return {k: v for k, v in wrapper.state_dict().items() if not k.startswith(PREFIX)}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            wrapper.load_state_dict(state_dict)

    return ModelWithoutObjectives()


class ObjectiveCheckpointing:
    """Mixin for a torchtitan ``CheckpointManager`` (0.2.2 and 0.3.0 have the same two
    methods and no hooks for this). Loads fit a checkpoint to the current stack first;
    model-only saves at the last step (``last_save_model_only``, ``export_dtype``, the HF
    export) leave the objective modules out, while seed checkpoints (step 0) keep them,
    since training starts from them."""

    def dcp_load(self, state_dict, checkpoint_id, from_hf, from_quantized):
        if from_hf:
            # A Hugging Face checkpoint is the plain model: the objectives keep their
            # initialization (the state-dict adapters know only the model's keys).
            state_dict = {k: v for k, v in state_dict.items() if objective_of(k) is None}
        else:
            state_dict = reconcile(state_dict, checkpoint_id)
        return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)

    def _save_last_step(self, curr_step: int) -> None:
        if not self.last_save_model_only or curr_step == 0:
            return super()._save_last_step(curr_step)
        full = self.states[MODEL]
        self.states[MODEL] = without_objectives(full)
        try:
            super()._save_last_step(curr_step)
        finally:
            self.states[MODEL] = full


def checkpoint_seams(module: str) -> tuple[tuple[str, str, str, str], ...]:
    """The private methods ``ObjectiveCheckpointing`` overrides, in a host's seams list
    (``module``: where that release keeps its ``CheckpointManager``)."""
    user = "../common/checkpoint_state"
    return (
        (
            module,
            "CheckpointManager._save_last_step",
            user,
            "leave the objectives' modules out of the model-only save at the last step",
        ),
        (module, "CheckpointManager.dcp_load", user, "fit a checkpoint to the stack first"),
    )
