"""Parallelizing the objectives' own modules, for every host: each objective is its own
FSDP2 unit (and compile, and tensor-parallel plan), kept out of the model's root unit."""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

from titan_objectives.stack import ObjectiveStack

logger = logging.getLogger(__name__)


@dataclass
class ObjectiveParallelism:
    """How a job parallelizes the model, in the terms the objectives need (each host
    reads it from its own config)."""

    fsdp_mesh: DeviceMesh | None
    """The data-parallel shard mesh (with the replicate mesh under HSDP); None: no FSDP."""
    tp_mesh: DeviceMesh | None
    loss_parallel: bool
    """Under TP: the model's logits stay vocabulary-sharded (torch's ``loss_parallel``)."""
    activation_checkpoint: bool
    compile_backend: str | None
    """``loss`` in ``compile.components``: the objectives are compiled with this backend."""
    compile_in_place: bool
    """Compile keeps the module (and its state_dict keys), as the host compiles its blocks."""
    training: Any
    """The host's training config (mixed precision and CPU offload: the same names)."""
    reshard_after_forward: str


def parallelize_with_objectives(
    model: nn.Module,
    stack: ObjectiveStack,
    shared: Any,
    parallelize_model: Callable[[nn.Module], nn.Module],
    plan: ObjectiveParallelism,
) -> nn.Module:
    """The host's parallelization of ``model`` (``parallelize_model``), then the stack's,
    attached as ``model.objectives``.

    Blocks of the model's own kind that objectives own (MTP's) are lent to ``layers``
    while the host parallelizes, so they get the trunk blocks' tensor-parallel plan,
    activation checkpointing, compile and FSDP2 unit; the rest of each objective then gets
    its own plan, AC, compile and FSDP2 unit. Keep ``model.objectives`` away from the
    host's root ``fully_shard`` (attach it after) unless the host needs it inside.
    """
    blocks = owned_blocks(stack, shared.block_class())
    # After the model's own keys (a pipeline stage keeps the model's numbering).
    first_lent = 1 + max((int(key) for key in model.layers), default=-1)
    for i, (parent, attribute) in enumerate(blocks):
        model.layers[str(first_lent + i)] = getattr(parent, attribute)
    model = parallelize_model(model)
    for i, (parent, attribute) in enumerate(blocks):
        key = str(first_lent + i)
        setattr(parent, attribute, model.layers[key])  # as wrapped: AC, compile, FSDP
        del model.layers[key]
    if blocks:
        logger.info(f"Parallelized {len(blocks)} objective block(s) like the model's own")
    if plan.activation_checkpoint:
        for objective in stack.objectives().values():
            objective.checkpoint_activations()
        logger.info("Objectives recompute their activations in backward, like the blocks")
    if plan.tp_mesh is not None:
        tensor_parallelize_objectives(stack, plan.tp_mesh)
        shared.use_tensor_parallel(plan.tp_mesh, plan.loss_parallel)
    if plan.compile_backend is not None:
        compile_objectives(stack, plan.compile_backend, plan.compile_in_place)
    if plan.fsdp_mesh is not None:
        shard_objectives(stack, plan.fsdp_mesh, plan.training, plan.reshard_after_forward)
    model.objectives = stack
    return model


def compile_objectives(stack: ObjectiveStack, backend: str, in_place: bool) -> None:
    """Each objective compiled on its own; ``in_place`` keeps the module (and its
    state_dict keys), else it is replaced by the compiled wrapper."""
    # Static shapes: training and validation batches each get their own graph. A dynamic
    # batch dimension breaks DTensor's sharding propagation under tensor parallelism.
    for name, objective in list(stack.items()):
        if in_place:
            objective.compile(backend=backend, dynamic=False)
        else:
            stack[name] = torch.compile(objective, backend=backend, dynamic=False)
    logger.info(f"Compiling objectives with torch.compile: {', '.join(stack)}")


def shard_objectives(
    stack: ObjectiveStack,
    mesh: Any,
    training: Any,
    reshard_after_forward_policy: str,
) -> None:
    """``training`` is the host's training config (``mixed_precision_param``,
    ``mixed_precision_reduce``, ``enable_cpu_offload``: the same names in both hosts)."""
    config: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=getattr(torch, training.mixed_precision_param),
            reduce_dtype=getattr(torch, training.mixed_precision_reduce),
        ),
        # The objectives run right after the trunk and are the first to run backward:
        # keeping their parameters gathered between the two saves an all-gather.
        "reshard_after_forward": reshard_after_forward_policy == "always",
    }
    if training.enable_cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    sharded = [name for name, objective in stack.items() if list(objective.parameters())]
    for name in sharded:
        fully_shard(stack[name], **config)
    logger.info(f"Applied FSDP to the objectives, one unit each: {', '.join(sharded)}")
    # torchtitan normalizes gradients by the global token count itself.
    for module in stack.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)


def tensor_parallelize_objectives(stack: ObjectiveStack, tp_mesh: Any) -> None:
    for name, objective in stack.objectives().items():
        plan = objective.tensor_parallel_plan()
        if plan:
            parallelize_module(objective, tp_mesh, plan)
        missed = [key for key, p in objective.named_parameters() if not isinstance(p, DTensor)]
        if missed:
            raise RuntimeError(
                f"objective {name!r}: tensor_parallel_plan() leaves parameters "
                f"{', '.join(missed)} unsplit; their gradients would not be reduced over "
                "the tensor-parallel group"
            )


def owned_blocks(stack: ObjectiveStack, block_cls: type[nn.Module]) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of each block of the model's own kind that an objective owns."""
    return [
        (parent, attribute)
        for parent in stack.modules()
        for attribute, child in parent.named_children()
        if isinstance(child, block_cls)
    ]


def vocabulary_sharded_logits(
    sequence_shard: torch.Tensor, weight: DTensor, keep_sharded: bool
) -> torch.Tensor:
    """What a model's own head does under TP: gather the sequence, multiply by this rank's
    vocabulary rows of ``weight`` (``Shard(0)``). The logits cover the whole sequence:
    vocabulary-sharded (a DTensor, for loss parallel) if ``keep_sharded``, else whole."""
    mesh = weight.device_mesh
    hidden = DTensor.from_local(sequence_shard, mesh, [Shard(1)]).redistribute(mesh, [Replicate()])
    logits = F.linear(hidden, weight)
    if keep_sharded:
        return logits
    return logits.redistribute(mesh, [Replicate()]).to_local()
