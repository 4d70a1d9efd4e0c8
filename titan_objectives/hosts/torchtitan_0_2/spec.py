"""A torchtitan 0.2.2 TrainSpec whose model carries the objective stack.

The model class is subclassed so that the stack the config checks built joins the model
on the meta device and is initialized by the model's own ``init_weights``; the parallelize
function is the shared one (``hosts.common.parallelize``) around torchtitan's own.
"""

import dataclasses
from functools import partial
from typing import Any

from torch import nn
from torchtitan.components.validate import build_validator
from torchtitan.protocols.train_spec import ParallelizeFunction, PipeliningFunction, TrainSpec

from titan_objectives.hosts.common.parallelize import (
    ObjectiveParallelism,
    parallelize_with_objectives,
)
from titan_objectives.hosts.common.pipeline import PipelineLoss
from titan_objectives.hosts.common.runtime import CheckedConfig
from titan_objectives.hosts.torchtitan_0_2.metrics import build_objective_metrics_processor
from titan_objectives.hosts.torchtitan_0_2.model_adapter import LAYOUT
from titan_objectives.hosts.torchtitan_0_2.validation import build_objective_validator


def model_class_with_objectives(model_cls: type[nn.Module], checked: CheckedConfig) -> type:
    class ModelWithObjectives(model_cls):  # type: ignore[valid-type, misc]
        def __init__(self, model_args: Any):
            super().__init__(model_args)
            self.objectives = checked.stack
            checked.shared.bind(self)

        def init_weights(self, *args: Any, **kwargs: Any) -> None:
            super().init_weights(*args, **kwargs)
            if self.objectives is not None:  # pipeline stages but the last have none
                self.objectives.init_weights()

    ModelWithObjectives.__name__ = ModelWithObjectives.__qualname__ = (
        f"{model_cls.__name__}WithObjectives"
    )
    return ModelWithObjectives


def objective_parallelism(parallel_dims: Any, job_config: Any) -> ObjectiveParallelism:
    """What the job's parallelism asks of the objectives, from a 0.2.2 job config."""
    fsdp_mesh = None
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        fsdp_mesh = parallel_dims.get_mesh(names)
    compile_config = job_config.compile
    return ObjectiveParallelism(
        fsdp_mesh=fsdp_mesh,
        tp_mesh=parallel_dims.get_mesh("tp") if parallel_dims.tp_enabled else None,
        loss_parallel=not job_config.parallelism.disable_loss_parallel,
        activation_checkpoint=job_config.activation_checkpoint.mode != "none",
        compile_backend=(
            compile_config.backend
            if compile_config.enable and "loss" in compile_config.components
            else None
        ),
        compile_in_place=False,
        training=job_config.training,
        reshard_after_forward=job_config.parallelism.fsdp_reshard_after_forward,
    )


def parallelize(
    parallelize_fn: ParallelizeFunction,
    checked: CheckedConfig,
    model: nn.Module,
    parallel_dims: Any,
    job_config: Any,
) -> nn.Module:
    """torchtitan's parallelization of the model (or of one pipeline stage of it), and
    the objectives', which join the stage that holds the head (``pipeline``)."""
    if parallel_dims.pp_enabled:
        # torchtitan's split leaves each stage an emptied copy of the stack.
        model.objectives = None
        if not LAYOUT.holds_output_head(model):
            return parallelize_fn(model, parallel_dims, job_config)
        checked.shared.bind(model)
    if parallel_dims.fsdp_enabled:
        # Out of torchtitan's root fully_shard; without FSDP, DDP must see them.
        del model.objectives
    return parallelize_with_objectives(
        model,
        checked.stack,
        checked.shared,
        lambda m: parallelize_fn(m, parallel_dims, job_config),
        objective_parallelism(parallel_dims, job_config),
    )


def pipeline(
    pipelining_fn: PipeliningFunction,
    loss: PipelineLoss,
    model: nn.Module,
    parallel_dims: Any,
    job_config: Any,
    device: Any,
    model_args: Any,
    parallelize_fn: ParallelizeFunction,
    loss_fn: Any,
) -> Any:
    """torchtitan's pipeline split and schedule, with the objectives' loss in the schedule
    (``loss``, bound to the runtime once the trainer has built it)."""
    return pipelining_fn(model, parallel_dims, job_config, device, model_args, parallelize_fn, loss)


def wrap_train_spec(
    base: TrainSpec, checked: CheckedConfig, pipeline_loss: PipelineLoss
) -> TrainSpec:
    if base.build_metrics_processor_fn is not None:
        raise NotImplementedError(
            "titan-objectives cannot yet combine with a TrainSpec that has its own metrics "
            "processor"
        )
    validator_fn = base.build_validator_fn
    if validator_fn is build_validator:
        validator_fn = build_objective_validator
    return dataclasses.replace(
        base,
        model_cls=model_class_with_objectives(base.model_cls, checked),
        parallelize_fn=partial(parallelize, base.parallelize_fn, checked),
        pipelining_fn=base.pipelining_fn and partial(pipeline, base.pipelining_fn, pipeline_loss),
        build_metrics_processor_fn=build_objective_metrics_processor,
        build_validator_fn=validator_fn,
    )
