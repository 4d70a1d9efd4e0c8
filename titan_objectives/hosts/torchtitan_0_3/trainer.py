"""torchtitan 0.3's Trainer, with the loss computed by the objective runtime.

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
from torch.distributed.tensor.parallel import loss_parallel
from torchtitan.components.optimizer import register_moe_load_balancing_hook
from torchtitan.distributed.context_parallel import cp_shard
from torchtitan.trainer import Trainer

from titan_objectives.config import Objectives
from titan_objectives.hosts.common import moe_balance
from titan_objectives.hosts.common.capture import DecoderLayout, DocumentsOf
from titan_objectives.hosts.common.pipeline import PipelineLoss
from titan_objectives.hosts.common.run_record import write_record
from titan_objectives.hosts.common.runtime import CheckedConfig, ObjectiveRuntime, context_layout
from titan_objectives.hosts.torchtitan_0_3.components import (
    ObjectiveCheckpointManager,
    ObjectiveMetricsProcessor,
    as_config,
)
from titan_objectives.hosts.torchtitan_0_3.model_adapter import (
    LAYOUT,
    ROUTER_BUFFERS,
    documents_by_position,
)
from titan_objectives.hosts.torchtitan_0_3.preflight import check_config, run_record
from titan_objectives.hosts.torchtitan_0_3.seams import extend_trainer_objects
from titan_objectives.hosts.torchtitan_0_3.spec import parallelize, pipeline
from titan_objectives.hosts.torchtitan_0_3.validation import ObjectiveValidator
from titan_objectives.sequence import ContextLayout

# How torchtitan 0.3's train_step says it stops on a non-finite loss (see seams.py).
NON_FINITE_STOP = "Loss is not finite"


class ObjectiveTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        objectives: Objectives = field(default_factory=Objectives)  # type: ignore[valid-type]
        """Loss objectives (titan-objectives): --objectives.stack ntp,nitp etc."""

    objectives: ObjectiveRuntime

    def __init__(self, config: Config):
        checked = check_config(config)
        write_record(*run_record(config, checked))
        pipeline_loss = PipelineLoss()
        self._build_objectives_components(config, checked, pipeline_loss)
        super().__init__(config)
        if config.checkpoint.create_seed_checkpoint:
            self._attach_objectives_for_the_seed(checked)
            return

        # The model returns logits only when an objective reads them; its own loss
        # function (config.loss) is not used. The last stage holds the head.
        self.model_parts[-1]._skip_lm_head = not checked.stack.requirements().logits
        extend_trainer_objects(self)
        self.objectives = ObjectiveRuntime(
            self, checked, self.model_parts, self.optimizers, config.validator.enable
        )
        pipeline_loss.score = self.objectives.pipeline_loss
        self.metrics_processor.objective_values = self.objectives.reduced_metrics
        if isinstance(getattr(self, "validator", None), ObjectiveValidator):
            self.validator.attach(self.objectives)
        if config.model_spec.post_optimizer_build_fn is register_moe_load_balancing_hook:
            # Balance the objectives' own routers exactly when torchtitan balances the trunk's.
            dims = self.parallel_dims
            mesh = self.objectives.loss_mesh
            meshes = [mesh] if mesh is not None else []
            if dims.ep_enabled and dims.tp > 1:  # as torchtitan 0.3 counts the trunk's
                meshes.insert(0, dims.get_mesh("tp"))
            moe_balance.install(self.optimizers, checked.stack, meshes, ROUTER_BUFFERS)

    @staticmethod
    def _build_objectives_components(
        config: Config, checked: CheckedConfig, pipeline_loss: PipelineLoss
    ) -> None:
        """The config classes that make the objectives' components, the parallelize
        function that attaches the stack, and the pipeline schedule's loss."""
        spec = config.model_spec
        config.model_spec = dataclasses.replace(
            spec,
            parallelize_fn=partial(parallelize, spec.parallelize_fn, checked),
            pipelining_fn=spec.pipelining_fn
            and partial(pipeline, spec.pipelining_fn, pipeline_loss),
        )
        config.metrics = as_config(config.metrics, ObjectiveMetricsProcessor.Config, "metrics")
        config.checkpoint = as_config(
            config.checkpoint, ObjectiveCheckpointManager.Config, "checkpoint"
        )
        config.validator = as_config(config.validator, ObjectiveValidator.Config, "validator")

    def _attach_objectives_for_the_seed(self, checked: CheckedConfig) -> None:
        """torchtitan skips the parallelize function for a seed checkpoint, so the stack
        joins the model here, on the CPU, initialized (the checkpointer's model state
        picks up new keys when it saves)."""
        model = self.model_parts[0]
        checked.shared.bind(model)
        stack = checked.stack
        stack.to_empty(device="cpu")
        with torch.no_grad():
            stack.init_weights()
        model.objectives = stack

    def context_layout(self) -> ContextLayout | None:
        return context_layout(
            self.parallel_dims,
            self.config.parallelism.context_parallel_load_balancer,
            cp_shard,
            self.device,
        )

    def model_layout(self) -> DecoderLayout:
        return LAYOUT

    def documents_of(self) -> DocumentsOf:
        return documents_by_position

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Cross-entropy of vocabulary-sharded logits under TP (the objectives compute
        it with torch's ``loss_parallel``, forward and backward)."""
        return loss_parallel() if self.parallel_dims.tp_enabled else contextlib.nullcontext()

    def train_step(self, data_iterator: Any) -> None:
        self.objectives.start_step(self.step)
        try:
            super().train_step(data_iterator)
        except RuntimeError as error:
            # torchtitan 0.3 stops on a non-finite loss at logging steps, before it logs;
            # the guard has kept the step out of the weights and decides: stop, naming
            # the objective and step, or skip and go on.
            guard = self.objectives.nonfinite
            if not (guard and str(error).startswith(NON_FINITE_STOP) and guard.step_skipped()):
                raise
            guard.report()
        logs_now = (
            self.metrics_processor.should_log(self.step) or self.step == self.config.training.steps
        )
        self.objectives.end_step(self.step, logs_now, self.metrics_processor.logger)

    def _forward_backward_body(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
        extra_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        with self.train_context():
            return self.objectives.forward_backward(
                lambda: self.model_parts[0](inputs, **extra_kwargs),
                labels,
                global_valid_tokens,
                backward=_backward_untyped,
            )

    def pp_forward_backward_step(self, **kwargs: Any) -> torch.Tensor:
        """torchtitan's pipeline step, its schedule scoring each micro-batch with the
        objectives on the last stage (whose losses are divided by the global valid tokens
        already)."""
        with self.train_context():
            return self.objectives.pipeline_forward_backward(
                lambda: super(ObjectiveTrainer, self).pp_forward_backward_step(**kwargs),
                len(kwargs["input_dict_mbs"]),
                kwargs["global_valid_tokens"],
            )


def _backward_untyped(loss: torch.Tensor) -> None:
    """torchtitan 0.3's backward: SPMD type propagation is for the forward only."""
    with spmd.no_typecheck():
        loss.backward()
