"""torchtitan 0.3's model spec with the objective stack: its parallelize function, then
the stack's (``hosts.common.parallelize``), the stack joining the model after it."""

from typing import Any

from torch import nn

from titan_objectives.hosts.common.parallelize import (
    ObjectiveParallelism,
    parallelize_with_objectives,
)
from titan_objectives.hosts.common.pipeline import PipelineLoss
from titan_objectives.hosts.common.runtime import CheckedConfig
from titan_objectives.hosts.torchtitan_0_3.model_adapter import LAYOUT


def objective_parallelism(kwargs: dict[str, Any]) -> ObjectiveParallelism:
    """What the job's parallelism asks of the objectives, from the keyword arguments
    torchtitan 0.3 gives a parallelize function."""
    dims = kwargs["parallel_dims"]
    compile_config = kwargs["compile_config"]
    names = ["dp_replicate", "fsdp"] if dims.dp_replicate_enabled else ["fsdp"]
    return ObjectiveParallelism(
        # torchtitan 0.3 applies FSDP2 always (a no-op gather at degree 1): so does the stack.
        fsdp_mesh=dims.get_mesh(names),
        tp_mesh=dims.get_mesh("tp") if dims.tp_enabled else None,
        loss_parallel=True,
        activation_checkpoint=kwargs["ac_config"] is not None,
        compile_backend=(
            compile_config.backend
            if compile_config.enable and "loss" in compile_config.components
            else None
        ),
        # In place, as torchtitan 0.3 compiles its blocks: its checkpoints take the plain
        # state_dict keys, which a compiled wrapper would change.
        compile_in_place=True,
        training=kwargs["training"],
        reshard_after_forward=kwargs["parallelism"].fsdp_reshard_after_forward,
    )


def parallelize(
    parallelize_fn: Any, checked: CheckedConfig, model: nn.Module, **kwargs: Any
) -> nn.Module:
    """torchtitan's parallelize function, then the stack's; the stack joins the model
    afterwards, out of torchtitan's root ``fully_shard``, and before the optimizer sees
    the parameters. Under pipeline parallelism it joins the stage that holds the head."""
    if kwargs["parallel_dims"].pp_enabled and not LAYOUT.holds_output_head(model):
        return parallelize_fn(model, **kwargs)
    checked.shared.bind(model)
    return parallelize_with_objectives(
        model,
        checked.stack,
        checked.shared,
        lambda m: parallelize_fn(m, **kwargs),
        objective_parallelism(kwargs),
    )


def pipeline(pipelining_fn: Any, loss: PipelineLoss, model: nn.Module, **kwargs: Any) -> Any:
    """torchtitan's pipeline split and schedule, with the objectives' loss in the schedule
    (``loss``, bound to the runtime once the trainer has built it; it divides by the
    global valid tokens itself, so torchtitan's ``global_valid_tokens`` is not used)."""
    kwargs["loss_fn"] = lambda pred, labels, **_: (loss(pred, labels), {})
    return pipelining_fn(model, **kwargs)
