"""torchtitan 0.3's Trainer, with the loss computed by the objective stack.

``ObjectiveTrainer.Config`` is torchtitan's ``Trainer.Config`` plus ``objectives`` (the
same section, options and checks as the ``[objectives]`` table of the 0.2.2 host), so
``config.build()`` makes this trainer and tyro parses ``--objectives.*`` flags.
"""

import contextlib
import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import spmd_types as spmd
import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel
from torchtitan.components.optimizer import register_moe_load_balancing_hook
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.protocols.module import Module as TitanModule
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import set_default_dtype
from torchtitan.trainer import Trainer

from titan_objectives.config import ObjectiveOptions, Objectives
from titan_objectives.hosts.common import checkpoint_state, moe_balance
from titan_objectives.hosts.common.capture import HiddenStateTap
from titan_objectives.hosts.common.geometry_probe import (
    GeometryProbe,
    build_probe,
    log_measurement,
)
from titan_objectives.hosts.common.nonfinite import NonFiniteGuard
from titan_objectives.hosts.common.parallelize import (
    compile_objectives,
    owned_blocks,
    shard_objectives,
    tensor_parallelize_objectives,
)
from titan_objectives.hosts.common.running_metrics import ObjectiveMetrics, log_step
from titan_objectives.hosts.torchtitan_0_3.model_adapter import (
    DecoderLayout,
    DecoderSharedModules,
    documents_of,
    model_info,
)
from titan_objectives.hosts.torchtitan_0_3.preflight import CheckedConfig, check_config
from titan_objectives.hosts.torchtitan_0_3.validation import ObjectiveValidation
from titan_objectives.objective import IGNORE_INDEX, Requirements
from titan_objectives.sequence import SequenceShards
from titan_objectives.stack import ObjectiveStack

# How torchtitan 0.3's train_step says it stops on a non-finite loss (see seams.py).
NON_FINITE_STOP = "Loss is not finite"


class HostedObjectiveStack(ObjectiveStack, TitanModule):
    """The stack as a torchtitan 0.3 module, so that ``model.init_weights`` initializes
    it: torchtitan's ``init_states`` reaches the blocks of the model's kind it holds
    first, then ``_init_self_parameters`` runs the objectives' own ``init_weights``
    (which initializes those blocks again, the way the objective wants)."""

    def _init_self_parameters(self) -> None:
        self.init_weights()


def build_stack(
    options: dict[str, ObjectiveOptions], model: nn.Module, training: Any
) -> tuple[HostedObjectiveStack, DecoderSharedModules]:
    """The objectives for ``model`` and the model modules they share, on the meta device
    and in the model's dtype, as torchtitan builds the model itself; their blocks come
    from the live model's config (after any ``override.imports``)."""
    shared = DecoderSharedModules(model, model.config)
    with torch.device("meta"), set_default_dtype(TORCH_DTYPE_MAP[training.dtype]):
        info = model_info(model.config, training.seq_len, shared)
        return HostedObjectiveStack(options, info), shared


def parallelize_with_objectives(
    parallelize_fn: Any,
    options: dict[str, ObjectiveOptions],
    model: nn.Module,
    **kwargs: Any,
) -> nn.Module:
    """torchtitan's parallelize function, with the objectives attached to the model.

    Blocks of the model's own kind that objectives own (MTP's) are lent to ``layers``
    while torchtitan parallelizes, so they get the trunk blocks' tensor-parallel plan,
    activation checkpointing, compile and FSDP2 unit; the rest of each objective then
    gets its own plan, AC, compile and FSDP2 unit. The stack joins the model afterwards,
    so that torchtitan's root ``fully_shard`` does not absorb it, and before the
    optimizer sees the parameters.
    """
    training, parallelism, parallel_dims = (
        kwargs["training"], kwargs["parallelism"], kwargs["parallel_dims"],
    )  # fmt: skip
    stack, shared = build_stack(options, model, training)
    blocks = owned_blocks(stack, type(model.layers[str(len(model.layers) - 1)]))
    first_lent = len(model.layers)
    for i, (parent, attribute) in enumerate(blocks):
        model.layers[str(first_lent + i)] = getattr(parent, attribute)
    model = parallelize_fn(model, **kwargs)
    for i, (parent, attribute) in enumerate(blocks):
        key = str(first_lent + i)
        setattr(parent, attribute, model.layers[key])  # as wrapped: AC, compile, FSDP
        del model.layers[key]
    if blocks:
        logger.info(f"Parallelized {len(blocks)} objective block(s) like the model's own")
    if kwargs["ac_config"] is not None:
        for objective in stack.objectives().values():
            objective.checkpoint_activations()
        logger.info("Objectives recompute their activations in backward, like the blocks")
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        tensor_parallelize_objectives(stack, tp_mesh)
        shared.use_tensor_parallel(tp_mesh)
    compile_config = kwargs["compile_config"]
    if compile_config.enable and "loss" in compile_config.components:
        # In place, as torchtitan 0.3 compiles its blocks: its checkpoints take the plain
        # state_dict keys, which a compiled wrapper would change.
        compile_objectives(stack, compile_config.backend, in_place=True)
    # torchtitan 0.3 applies FSDP2 always (a no-op gather at degree 1): so does the stack.
    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    shard_objectives(
        stack, parallel_dims.get_mesh(names), training, parallelism.fsdp_reshard_after_forward
    )
    model.objectives = stack
    return model


class ObjectiveTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        objectives: Objectives = field(default_factory=Objectives)  # type: ignore[valid-type]
        """Loss objectives (titan-objectives): --objectives.stack ntp,nitp etc."""

    objective_stack: ObjectiveStack
    objective_metrics: ObjectiveMetrics
    hidden_states: HiddenStateTap

    def __init__(self, config: Config):
        checked = check_config(config)
        self.pipeline_passthrough = config.parallelism.pipeline_parallel_degree > 1
        if self.pipeline_passthrough:
            logger.info(
                "Pipeline parallel with a plain ntp stack: torchtitan's own training step "
                "(no objectives/* metrics)"
            )
            super().__init__(config)
            return
        spec = config.model_spec
        config.model_spec = dataclasses.replace(
            spec,
            parallelize_fn=partial(
                parallelize_with_objectives, spec.parallelize_fn, checked.options
            ),
        )
        super().__init__(config)
        if config.checkpoint.create_seed_checkpoint:
            self._attach_objectives_for_the_seed(checked)
            return

        model = self.model_parts[0]
        self.objective_stack = model.objectives
        needs = self.objective_stack.requirements()
        # The model returns logits only when an objective reads them; its own loss
        # function (config.loss) is not used.
        self.reads_logits = needs.logits
        model._skip_lm_head = not needs.logits
        self.objective_metrics = ObjectiveMetrics(self.objective_stack.weights())
        self.loss_mesh = (
            self.parallel_dims.get_optional_mesh("loss")
            if self.parallel_dims.dp_cp_enabled
            else None
        )
        self._log_objectives_with_metrics()
        # torchtitan's tensor parallelism is sequence parallel: objectives get shards.
        tp = self.parallel_dims.tp_enabled
        self.sequence = SequenceShards(self.parallel_dims.get_mesh("tp") if tp else None)
        self.geometry, self.geometry_freq = self._build_geometry(checked)
        if self.geometry is not None:
            needs = needs | Requirements(
                final_hidden=True, layers=frozenset(self.geometry.keys[1:])
            )
        self.hidden_states = HiddenStateTap(model, DecoderLayout(), needs, documents_of)
        if config.validator.enable:
            ObjectiveValidation(
                self.validator, self.hidden_states, self.objective_stack, self.geometry,
                self.loss_mesh, self.sequence, self.reads_logits, self._loss_parallel,
            )  # fmt: skip
        if self.checkpointer.enable:
            checkpoint_state.install(self.checkpointer)
        if config.model_spec.post_optimizer_build_fn is register_moe_load_balancing_hook:
            # Balance the objectives' own routers exactly when torchtitan balances the trunk's.
            dims = self.parallel_dims
            meshes = [self.loss_mesh] if self.loss_mesh is not None else []
            if dims.ep_enabled and dims.tp > 1:  # as torchtitan 0.3 counts the trunk's
                meshes.insert(0, dims.get_mesh("tp"))
            moe_balance.install(
                self.optimizers, self.objective_stack, meshes, moe_balance.TORCHTITAN_0_3
            )
        self.nonfinite: NonFiniteGuard | None = None
        if checked.nonfinite != "off":
            self.nonfinite = NonFiniteGuard(
                list(self.objective_stack), checked.nonfinite, self.optimizers, self.loss_mesh,
                self.device,
            )  # fmt: skip

    def _attach_objectives_for_the_seed(self, checked: CheckedConfig) -> None:
        """torchtitan skips the parallelize function for a seed checkpoint, so the stack
        joins the model here, on the CPU, initialized (the checkpointer's model state
        picks up new keys when it saves)."""
        model = self.model_parts[0]
        stack, _ = build_stack(checked.options, model, self.config.training)
        stack.to_empty(device="cpu")
        with torch.no_grad():
            stack.init_weights()
        model.objectives = stack

    def _log_objectives_with_metrics(self) -> None:
        """torchtitan's metrics line and TensorBoard, plus the objectives' values."""
        processor = self.metrics_processor
        log = processor.log

        def log_with_objectives(step: int, *args: Any, **kwargs: Any) -> None:
            values = self.objective_metrics.reduce(self.loss_mesh)
            log_step(log, values, processor.color, step, *args, **kwargs)

        processor.log = log_with_objectives

    def _build_geometry(self, checked: CheckedConfig) -> tuple[GeometryProbe | None, int]:
        options = checked.geometry
        if not options.freq and not self.config.validator.enable:
            return None, 0
        probe = build_probe(
            options, self.objective_stack.requirements().geometry_layers,
            checked.model_info.dim, self.parallel_dims, self.loss_mesh, self.sequence,
        )  # fmt: skip
        return probe, options.freq

    def _loss_parallel(self) -> contextlib.AbstractContextManager:
        """Cross-entropy of vocabulary-sharded logits under TP (the objectives compute
        it with torch's ``loss_parallel``, forward and backward)."""
        return loss_parallel() if self.parallel_dims.tp_enabled else contextlib.nullcontext()

    def _geometry_due(self) -> bool:
        return bool(self.geometry_freq) and self.step % self.geometry_freq == 0

    def train_step(self, data_iterator: Any) -> None:
        if self.pipeline_passthrough:
            return super().train_step(data_iterator)
        if self.nonfinite is not None:
            self.nonfinite.start_step(self.step)
        self._geometry_sampled = False
        self.objective_metrics.reset()
        self.objective_stack.set_step(self.step)
        self.objective_metrics.weights = self.objective_stack.weights()
        try:
            super().train_step(data_iterator)
        except RuntimeError as error:
            # torchtitan 0.3 stops on a non-finite loss at logging steps, before it logs;
            # the guard has kept the step out of the weights and decides: stop, naming
            # the objective and step, or skip and go on.
            guard = self.nonfinite
            if not (guard and str(error).startswith(NON_FINITE_STOP) and guard.step_skipped()):
                raise
            guard.report()
        if self._geometry_due():
            log_measurement(self.geometry, self.step, self.metrics_processor.logger)
        last_step = self.step == self.config.training.steps
        if self.nonfinite is not None and (
            self.metrics_processor.should_log(self.step) or last_step
        ):
            self.nonfinite.report()

    def _forward_backward_body(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
        extra_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        with self.train_context(), self._loss_parallel():
            with self.hidden_states.capture() as captured:
                pred = self.model_parts[0](inputs, **extra_kwargs)
            if self._geometry_due() and not self._geometry_sampled:
                valid = labels != IGNORE_INDEX
                self.geometry.take_sample(captured.hidden, seed=self.step, valid=valid)
                self._geometry_sampled = True
            logits = pred if self.reads_logits else None
            output = self.objective_stack(captured.features(labels, logits, self.sequence))
            loss = output.weighted_loss_sum / global_valid_tokens
            # Free the logits and hidden states before backward, as torchtitan does.
            del pred, logits, captured
            with spmd.no_typecheck():
                loss.backward()

        self.objective_metrics.add(output, global_valid_tokens)
        if self.nonfinite is not None:
            self.nonfinite.record([out.loss_sum for out in output.outputs.values()])
        return loss
