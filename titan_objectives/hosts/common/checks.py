"""Config checks decided from what the stacked objectives declare, for every host.

Both torchtitan releases keep the settings these read under the same names
(``parallelism.*``, ``training.seq_len``), so the checks and their messages are shared;
each host adds what only it has. The stack is built here, once, on the meta device: a
stack that cannot be built fails before any allocation, and the trainer uses it.
"""

import contextlib
import dataclasses
import fnmatch
import importlib.metadata
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
)

from titan_objectives.config import SECTION, ObjectivesConfigError, resolve_stack
from titan_objectives.hosts.common.runtime import CheckedConfig
from titan_objectives.objective import ModelInfo, Requirements
from titan_objectives.stack import ObjectiveStack, settings

logger = logging.getLogger(__name__)

# The styles that make a module's parameters DTensors (split or replicated).
PARAMETER_STYLES = (ColwiseParallel, RowwiseParallel, SequenceParallel)


@contextlib.contextmanager
def _building_on_meta(dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are on the meta device, in ``dtype``: as the hosts build the
    model itself."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(previous)


def check_objectives(
    job_config: Any,
    info: ModelInfo,
    model_name: str,
    dtype: torch.dtype,
    stack_class: type[ObjectiveStack] = ObjectiveStack,
) -> CheckedConfig:
    """The job's objectives section, resolved against the model ``info`` describes: the
    stack built once on the meta device (``info.shared`` not yet bound to a model) and
    checked against the job's parallelism; the trainer attaches this very stack to the
    model. ``model_name`` names the model in messages."""
    section = job_config.objectives
    entries = resolve_stack(section, info)
    with _building_on_meta(dtype):
        stack = stack_class.build(entries, info, model_name)
    warn_if_nothing_reads_the_head(stack.declarations())
    block_class = (
        info.shared.block_class() if job_config.parallelism.tensor_parallel_degree > 1 else None
    )
    check_parallelism(job_config, stack, info.n_layers, block_class)
    logger.info(run_summary(stack))
    geometry = dataclasses.replace(section.geometry)
    schedule = job_config.parallelism.pipeline_parallel_schedule
    return CheckedConfig(info, stack, section.nonfinite, geometry, schedule)


def run_summary(stack: ObjectiveStack) -> str:
    """The run's first line of ours: which torchtitan and torch it runs on, and the stack
    with its weights at step 1."""
    versions = {name: importlib.metadata.version(name) for name in ("torchtitan", "torch")}
    objectives = " + ".join(f"{name} × {weight:g}" for name, weight in stack.weights().items())
    return (
        f"titan-objectives on torchtitan {versions['torchtitan']} (torch {versions['torch']}): "
        f"{objectives}"
    )


def warn_if_nothing_reads_the_head(needs: dict[str, Requirements]) -> None:
    if not any(need.logits or need.output_weight for need in needs.values()):
        logger.warning(
            f"{SECTION}.stack = {list(needs)!r}: no objective reads the output head (its "
            "logits or its weight), so the model will not be trained to predict tokens; "
            "add ntp"
        )


# The pipeline schedules the objectives run under, each tested equal to one process, with
# their default stages per rank. DualPipeV needs an accelerator (untested here), and its
# expert-parallel overlap runs a backward beside a stage's forward and loss.
PIPELINE_SCHEDULES = {
    "GPipe": 1,
    "1F1B": 1,
    "Interleaved1F1B": 2,
    "LoopedBFS": 2,
    "InterleavedZeroBubble": 2,
    "ZBVZeroBubble": 2,
}


def pipeline_stages(parallelism: Any, n_layers: int) -> int:
    """How many stages torchtitan cuts the model into (its own rule)."""
    if parallelism.module_fqns_per_model_part:
        return len(parallelism.module_fqns_per_model_part)
    per_stage = parallelism.pipeline_parallel_layers_per_stage
    if per_stage is None:
        schedule = PIPELINE_SCHEDULES[parallelism.pipeline_parallel_schedule]
        return parallelism.pipeline_parallel_degree * schedule
    weights = (
        parallelism.pipeline_parallel_first_stage_less_layers
        + parallelism.pipeline_parallel_last_stage_less_layers
    )
    return math.ceil((n_layers + weights) / per_stage)


def check_pipeline_parallel(job_config: Any, stack: ObjectiveStack, n_layers: int) -> None:
    """The schedule, micro-batches and stage split against what the objectives need: each
    micro-batch is scored on the last stage, which every layer they read must reach."""
    parallelism = job_config.parallelism
    named = f"{SECTION}.stack = {list(stack.options())!r}"
    if parallelism.pipeline_parallel_schedule_csv:
        raise ObjectivesConfigError(
            f"parallelism.pipeline_parallel_schedule_csv = "
            f"{parallelism.pipeline_parallel_schedule_csv!r} with {named}: the objectives run "
            f"under torchtitan's named schedules ({', '.join(PIPELINE_SCHEDULES)}); leave it empty"
        )
    schedule = parallelism.pipeline_parallel_schedule
    if schedule not in PIPELINE_SCHEDULES:
        raise ObjectivesConfigError(
            f"parallelism.pipeline_parallel_schedule = {schedule!r} with {named}: the objectives "
            f"score micro-batches under {', '.join(PIPELINE_SCHEDULES)}; use one of them"
        )
    local, micro = (
        job_config.training.local_batch_size,
        parallelism.pipeline_parallel_microbatch_size,
    )
    stages = pipeline_stages(parallelism, n_layers)
    if local % micro or local // micro < stages:
        raise ObjectivesConfigError(
            f"training.local_batch_size = {local} with "
            f"parallelism.pipeline_parallel_microbatch_size = {micro} gives {local / micro:g} "
            f"micro-batches for {stages} pipeline stages ({schedule}): the objectives need a "
            "whole number of micro-batches, at least one per stage; raise "
            "training.local_batch_size or lower the micro-batch size"
        )
    if parallelism.module_fqns_per_model_part:
        check_stage_modules(parallelism.module_fqns_per_model_part, stack, n_layers)


# Schedules whose evaluation torch cannot run: ZBV's asks a stage for a backward it does
# not have (torch 2.13 and 2.14; plain torchtitan validation fails the same way).
SCHEDULES_WITHOUT_EVALUATION = ("ZBVZeroBubble",)


def check_pipeline_validation(job_config: Any, validation_flag: str) -> None:
    """Validation under pipeline parallelism runs the schedule's evaluation."""
    schedule = job_config.parallelism.pipeline_parallel_schedule
    if (
        job_config.parallelism.pipeline_parallel_degree > 1
        and schedule in SCHEDULES_WITHOUT_EVALUATION
    ):
        usable = [name for name in PIPELINE_SCHEDULES if name not in SCHEDULES_WITHOUT_EVALUATION]
        raise ObjectivesConfigError(
            f"{validation_flag} with parallelism.pipeline_parallel_schedule = {schedule!r}: "
            f"torch cannot evaluate under this schedule (its evaluation asks a stage for a "
            f"backward it does not have); use one of {', '.join(usable)}, or turn "
            f"{validation_flag} off"
        )


def check_stage_modules(parts: list[list[str]], stack: ObjectiveStack, n_layers: int) -> None:
    """A user's split (``parallelism.module_fqns_per_model_part``): the final norm on the
    last stage, every layer an objective reads on some stage, blocks in model order."""
    where = {name: index for index, part in enumerate(parts) for name in part}
    named = f"parallelism.module_fqns_per_model_part = {parts!r}"
    if where.get("norm") != len(parts) - 1:
        raise ObjectivesConfigError(
            f"{named}: the objectives read the final norm's output on the last stage; put "
            "'norm' and the output head in the last part"
        )
    modules = ["tok_embeddings", *(f"layers.{k}" for k in range(n_layers))]
    stage_of = [where.get(module) for module in modules]
    for name, needs in stack.declarations().items():
        missing = [k for k in sorted(needs.layers) if stage_of[k] is None]
        if missing:
            raise ObjectivesConfigError(
                f"{named}: {name} reads layer(s) {missing}, whose module ({modules[missing[0]]}) "
                "no stage holds; give every block and the embeddings a stage"
            )
    held = [stage for stage in stage_of if stage is not None]
    if held != sorted(held):
        raise ObjectivesConfigError(
            f"{named}: the blocks must follow the model's order over the stages (the layers "
            "the objectives read are carried forward to the last stage)"
        )


def check_parallelism(
    job_config: Any, stack: ObjectiveStack, n_layers: int, block_class: type[nn.Module] | None
) -> None:
    """The job's parallelism against what the stacked objectives declare, for a model of
    ``n_layers`` blocks (``block_class``: the model's blocks, which the model's own
    parallelization splits)."""
    needs = stack.declarations()
    parallelism = job_config.parallelism
    if parallelism.pipeline_parallel_degree > 1:
        check_pipeline_parallel(job_config, stack, n_layers)
    if parallelism.context_parallel_degree > 1:
        check_context_parallel(job_config, stack)
    if parallelism.tensor_parallel_degree > 1:
        check_tensor_parallel(job_config, stack, block_class)
    head_readers = [name for name, need in needs.items() if need.output_weight]
    if head_readers and parallelism.fsdp_reshard_after_forward == "always":
        raise ObjectivesConfigError(
            f"parallelism.fsdp_reshard_after_forward = 'always' with "
            f"{', '.join(head_readers)}: they read the output head's weight after the forward, "
            "which 'always' frees; use 'default' or 'never'"
        )


def shortest_run(seq_len: int, degree: int, balanced: bool, tensor_parallel: int) -> int:
    """The fewest consecutive positions any rank holds together: a group holds one chunk
    per context-parallel rank (two, load-balanced) and splits them evenly over its
    tensor-parallel ranks, whose shards may cut a chunk."""
    chunk = seq_len // (2 * degree if balanced else degree)
    group = chunk * (2 if balanced else 1)
    shard = group // tensor_parallel
    runs = []
    for first in range(0, group, shard):
        cuts = {first, first + shard} | {
            c for c in range(chunk, group, chunk) if first < c < first + shard
        }
        ordered = sorted(cuts)
        runs += [b - a for a, b in zip(ordered, ordered[1:], strict=False)]
    return min(runs)


def check_context_parallel(config: Any, stack: ObjectiveStack) -> None:
    """The sequence splits into chunks as torchtitan lays them out, and every objective's
    shift of hidden states stays within the run of consecutive positions a rank holds."""
    parallelism = config.parallelism
    balancer = parallelism.context_parallel_load_balancer
    if balancer not in (None, "headtail"):
        raise ObjectivesConfigError(
            f"parallelism.context_parallel_load_balancer = {balancer!r}: the objectives "
            "follow torchtitan's 'headtail' layout or none (None); 'ptrr' lays positions out "
            "by the attention mask, which they do not read"
        )
    check_context_parallel_split(config)
    degree = parallelism.context_parallel_degree
    unsupported = [
        name for name, objective in stack.objectives().items() if not objective.sequence_parallel
    ]
    if unsupported:
        raise ObjectivesConfigError(
            f"{SECTION}.stack has {', '.join(unsupported)}, which cannot run with "
            f"parallelism.context_parallel_degree = {degree}: each rank holds chunks of every "
            "sequence, and the objective does not declare sequence_parallel = True (that it "
            "reads positions through features.sequence; see docs/writing-objectives.md); "
            "use FSDP (data_parallel_shard_degree) instead"
        )
    run = shortest_run(
        config.training.seq_len, degree, balancer is not None, parallelism.tensor_parallel_degree
    )
    needs = stack.declarations()
    too_far = {name: need.shard_reach for name, need in needs.items() if need.shard_reach > run}
    if too_far:
        reads = ", ".join(f"{name} shifts hidden states {reach}" for name, reach in too_far.items())
        raise ObjectivesConfigError(
            f"training.seq_len = {config.training.seq_len} with "
            f"parallelism.context_parallel_degree = {degree}: a rank holds runs of {run} "
            f"consecutive positions, and {reads} positions ahead; use a longer seq_len or a "
            "smaller degree"
        )


def check_context_parallel_split(config: Any, multiple: int = 1) -> None:
    """Context parallelism cuts each sequence into equal chunks, two per rank when load
    balanced (each rank takes one from the head and one from the tail); ``multiple``: what
    each rank's share must also be whole blocks of (a host's attention mask blocks)."""
    parallelism = config.parallelism
    degree, seq_len = parallelism.context_parallel_degree, config.training.seq_len
    balanced = bool(parallelism.context_parallel_load_balancer)
    chunks = 2 * degree if balanced else degree
    step = math.lcm(chunks, multiple * degree)
    if seq_len % step:
        how = "two per rank, load-balanced" if balanced else "one per rank"
        raise ObjectivesConfigError(
            f"training.seq_len = {seq_len} with parallelism.context_parallel_degree = "
            f"{degree}: context parallelism cuts each sequence into {chunks} chunks ({how})"
            + (f", each rank's share whole {multiple}-position mask blocks" if multiple > 1 else "")
            + f"; use a seq_len divisible by {step}"
        )


def _plan_matches(pattern: str, module_name: str) -> bool:
    """Whether a ``parallelize_module`` plan key names this module (fnmatch per atom)."""
    atoms, parts = pattern.split("."), module_name.split(".")
    return len(atoms) == len(parts) and all(map(fnmatch.fnmatch, parts, atoms))


def unsplit_parameters(
    objective: nn.Module, plan: dict[str, ParallelStyle], block_class: type[nn.Module] | None
) -> list[str]:
    """The parameters ``parallelize_module(objective, mesh, plan)`` would leave as plain
    tensors (no style that distributes parameters on them or a module above them), blocks
    of the model's kind aside: the model's own parallelization splits those."""
    covered = [
        module_name
        for module_name, module in objective.named_modules()
        if module_name
        and (
            (block_class is not None and isinstance(module, block_class))
            or any(
                isinstance(style, PARAMETER_STYLES) and _plan_matches(pattern, module_name)
                for pattern, style in plan.items()
            )
        )
    ]
    return [
        name
        for name, _ in objective.named_parameters()
        if not any(name.startswith(f"{module}.") for module in covered)
    ]


def check_tensor_parallel(
    job_config: Any, stack: ObjectiveStack, block_class: type[nn.Module] | None = None
) -> None:
    options, needs = stack.options(), stack.declarations()
    degree = job_config.parallelism.tensor_parallel_degree
    tp = f"parallelism.tensor_parallel_degree = {degree}"
    unsupported = [
        name for name, objective in stack.objectives().items() if not objective.sequence_parallel
    ]
    if unsupported:
        raise ObjectivesConfigError(
            f"{SECTION}.stack has {', '.join(unsupported)}, which cannot run with {tp}: the "
            "objective does not declare sequence_parallel = True (see the README, 'Write your "
            "own objective'); use FSDP (data_parallel_shard_degree) instead"
        )
    for name, objective in stack.objectives().items():
        missed = unsplit_parameters(objective, objective.tensor_parallel_plan(), block_class)
        if missed:
            raise ObjectivesConfigError(
                f"{SECTION}.{name}{settings(options[name])} with {tp}: its "
                f"tensor_parallel_plan() leaves parameters {', '.join(missed)} unsplit, and "
                "their gradients would not be reduced over the tensor-parallel group; give "
                "each module a ColwiseParallel, RowwiseParallel or SequenceParallel style "
                "(see docs/writing-objectives.md) or use FSDP instead"
            )
    for name, need in needs.items():
        if need.whole_vocabulary:
            raise ObjectivesConfigError(
                f"{SECTION}.{name}{settings(options[name])} with {tp}: these options need the "
                "whole vocabulary on each rank, and tensor parallelism splits the output head "
                "over the vocabulary; change them (for ntp and mtp: ce_backend = 'auto' or "
                "'chunked', whose chunks split the vocabulary too) or use FSDP instead"
            )
    shard = job_config.training.seq_len // degree
    for name, need in needs.items():
        if need.shard_reach > shard:
            raise ObjectivesConfigError(
                f"{SECTION}.{name}{settings(options[name])} reads hidden states "
                f"{need.shard_reach} positions ahead, with {tp} and training.seq_len = "
                f"{job_config.training.seq_len}: each rank holds {shard} positions of them, "
                "and an objective may not read further than one shard ahead; read at most "
                f"{shard} ahead or use a smaller tensor_parallel_degree"
            )
