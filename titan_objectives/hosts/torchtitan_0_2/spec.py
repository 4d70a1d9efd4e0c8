"""A torchtitan TrainSpec whose model carries the objectives' modules.

The model class is subclassed so that the objectives are built on the meta device with
the rest of the model and initialized by the model's own ``init_weights``.

Parallelization: blocks of the model's own kind that objectives own (MTP's) are lent to
the model's ``layers`` while torchtitan's parallelize function runs, so they get exactly
the trunk blocks' tensor/expert parallel plan, activation checkpointing, compile and
FSDP2 unit. The rest of each objective then gets its own tensor-parallel plan, compile
(``loss`` in ``compile.components``) and FSDP2 unit; the objectives are kept out of the
model meanwhile so that torchtitan's root ``fully_shard`` does not absorb them.
"""

import dataclasses
from functools import partial
from typing import Any

from torch import nn
from torchtitan.components.validate import build_validator
from torchtitan.protocols.train_spec import ParallelizeFunction, TrainSpec
from torchtitan.tools.logging import logger

from titan_objectives.hosts.common.parallelize import (
    compile_objectives,
    owned_blocks,
    shard_objectives,
    tensor_parallelize_objectives,
)
from titan_objectives.hosts.torchtitan_0_2.metrics import build_objective_metrics_processor
from titan_objectives.hosts.torchtitan_0_2.model_adapter import DecoderAdapter
from titan_objectives.hosts.torchtitan_0_2.validation import build_objective_validator
from titan_objectives.objective import ObjectiveOptions
from titan_objectives.stack import ObjectiveStack


def model_class_with_objectives(
    model_cls: type[nn.Module], adapter: DecoderAdapter, options: dict[str, ObjectiveOptions]
) -> type[nn.Module]:
    class ModelWithObjectives(model_cls):  # type: ignore[valid-type, misc]
        def __init__(self, model_args: Any):
            super().__init__(model_args)
            shared = adapter.shared_modules(model_args, model=self)
            info = adapter.model_info(model_args, model_args.max_seq_len, shared=shared)
            self.objectives = ObjectiveStack(options, info)
            self.objective_shared_modules = info.shared

        def init_weights(self, *args: Any, **kwargs: Any) -> None:
            super().init_weights(*args, **kwargs)
            self.objectives.init_weights()

    ModelWithObjectives.__name__ = ModelWithObjectives.__qualname__ = (
        f"{model_cls.__name__}WithObjectives"
    )
    return ModelWithObjectives


def parallelize_with_objectives(
    parallelize_fn: ParallelizeFunction,
    adapter: DecoderAdapter,
    model: nn.Module,
    parallel_dims: Any,
    job_config: Any,
) -> nn.Module:
    stack: ObjectiveStack = model.objectives
    blocks = owned_blocks(stack, adapter.block_class())
    first_lent = len(model.layers)
    for i, (parent, attribute) in enumerate(blocks):
        model.layers[str(first_lent + i)] = getattr(parent, attribute)
    if blocks:
        logger.info(f"Parallelizing {len(blocks)} objective block(s) like the model's own")
    # Without FSDP nothing absorbs the objectives, and DDP must see their parameters.
    detach = parallel_dims.fsdp_enabled
    if detach:
        del model.objectives
    model = parallelize_fn(model, parallel_dims, job_config)
    for i, (parent, attribute) in enumerate(blocks):
        key = str(first_lent + i)
        setattr(parent, attribute, model.layers[key])  # as wrapped: AC, compile, FSDP
        del model.layers[key]

    if job_config.activation_checkpoint.mode != "none":
        for objective in stack.objectives().values():
            objective.checkpoint_activations()
        logger.info("Objectives recompute their activations in backward, like the blocks")
    if parallel_dims.tp_enabled:
        tensor_parallelize_objectives(stack, parallel_dims.get_mesh("tp"))
        model.objective_shared_modules.use_tensor_parallel(
            loss_parallel=not job_config.parallelism.disable_loss_parallel
        )
    if job_config.compile.enable and "loss" in job_config.compile.components:
        compile_objectives(stack, job_config.compile.backend)
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        shard_objectives(
            stack,
            parallel_dims.get_mesh(names),
            job_config.training,
            job_config.parallelism.fsdp_reshard_after_forward,
        )
    if detach:
        model.objectives = stack
    return model


def wrap_train_spec(
    base: TrainSpec, adapter: DecoderAdapter, options: dict[str, ObjectiveOptions]
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
        model_cls=model_class_with_objectives(base.model_cls, adapter, options),
        parallelize_fn=partial(parallelize_with_objectives, base.parallelize_fn, adapter),
        build_metrics_processor_fn=build_objective_metrics_processor,
        build_validator_fn=validator_fn,
    )
