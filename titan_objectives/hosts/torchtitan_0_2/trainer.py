"""torchtitan 0.2.2's Trainer, with the loss computed by the objective runtime."""

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torchtitan.protocols.train_spec as train_spec_module
from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing
from torchtitan.distributed.context_parallel import cp_shard
from torchtitan.train import Trainer

from titan_objectives.hosts.common import moe_balance
from titan_objectives.hosts.common.capture import DecoderLayout, DocumentsOf
from titan_objectives.hosts.common.pipeline import PipelineLoss
from titan_objectives.hosts.common.run_record import write_record
from titan_objectives.hosts.common.runtime import ObjectiveRuntime, context_layout
from titan_objectives.hosts.torchtitan_0_2.model_adapter import (
    LAYOUT,
    ROUTER_BUFFERS,
    documents_by_eos,
)
from titan_objectives.hosts.torchtitan_0_2.preflight import check_config, run_record
from titan_objectives.hosts.torchtitan_0_2.seams import extend_trainer_objects
from titan_objectives.hosts.torchtitan_0_2.spec import wrap_train_spec
from titan_objectives.hosts.torchtitan_0_2.validation import ObjectiveValidator
from titan_objectives.sequence import ContextLayout


@contextmanager
def _train_spec_override(name: str, spec: train_spec_module.TrainSpec | None) -> Iterator[None]:
    """Serve ``spec`` (if any) for ``name`` while the Trainer builds itself. torchtitan
    looks at user registrations before its own models, so the config keeps the model's
    real name."""
    if spec is None:
        yield
        return
    registry = train_spec_module._extra_train_specs
    previous = registry.get(name)
    registry[name] = spec
    try:
        yield
    finally:
        if previous is None:
            del registry[name]
        else:
            registry[name] = previous


class ObjectiveTrainer(Trainer):
    objectives: ObjectiveRuntime

    def __init__(self, job_config: Any):
        checked = check_config(job_config)
        write_record(*run_record(job_config, checked))
        name = job_config.model.name
        pipeline_loss = PipelineLoss()
        spec = wrap_train_spec(train_spec_module.get_train_spec(name), checked, pipeline_loss)
        with _train_spec_override(name, spec):
            super().__init__(job_config)

        extend_trainer_objects(self)
        self.objectives = ObjectiveRuntime(
            self, checked, self.model_parts, self.optimizers, job_config.validation.enable
        )
        pipeline_loss.score = self.objectives.pipeline_loss
        self.metrics_processor.objective_values = self.objectives.reduced_metrics
        if isinstance(getattr(self, "validator", None), ObjectiveValidator):
            self.validator.attach(self.objectives)
        if self.train_spec.build_optimizers_fn is build_optimizers_with_moe_load_balancing:
            # Balance the objectives' own routers exactly when torchtitan balances the trunk's.
            mesh = self.objectives.loss_mesh
            moe_balance.install(
                self.optimizers, checked.stack, [mesh] if mesh else [], ROUTER_BUFFERS
            )

    def context_layout(self) -> ContextLayout | None:
        return context_layout(
            self.parallel_dims,
            self.job_config.parallelism.context_parallel_load_balancer,
            cp_shard,
            self.device,
        )

    def model_layout(self) -> DecoderLayout:
        return LAYOUT

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Nothing: torchtitan 0.2.2's training and validation contexts already hold
        ``loss_parallel`` when the logits are vocabulary-sharded."""
        return contextlib.nullcontext()

    def documents_of(self) -> DocumentsOf | None:
        eos_id = self.tokenizer.eos_id if self.tokenizer else None
        return documents_by_eos(self.model_args, eos_id)

    def train_step(self, data_iterator: Any) -> None:
        self.objectives.start_step(self.step)
        super().train_step(data_iterator)
        logs_now = (
            self.metrics_processor.should_log(self.step)
            or self.step == self.job_config.training.steps
        )
        self.objectives.end_step(self.step, logs_now, self.metrics_processor.logger)

    def forward_backward_step(
        self,
        *,
        input_dict: dict[str, torch.Tensor],
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
    ) -> torch.Tensor:
        inputs, labels, extra_inputs, extra_kwargs = self.post_dataloading_process(
            input_dict, labels
        )
        if self.parallel_dims.pp_enabled:
            return self._pipeline_forward_backward(
                inputs, labels, {**extra_inputs, **extra_kwargs}, global_valid_tokens
            )
        model = self.model_parts[0]
        with self.train_context():
            return self.objectives.forward_backward(
                lambda: model(inputs, **extra_inputs, **extra_kwargs),
                labels,
                global_valid_tokens,
                autocast=self.maybe_enable_amp,
            )

    def _pipeline_forward_backward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        kwargs: dict[str, Any],
        global_valid_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """torchtitan's pipeline step, its schedule scoring each micro-batch with the
        objectives on the last stage (whose losses are divided by the global valid tokens
        already); the ranks without the last stage report -1, as torchtitan's do."""

        def run_schedule() -> torch.Tensor:
            losses = [] if self.pp_has_last_stage else None
            args = (inputs,) if self.pp_has_first_stage else ()
            target = labels if self.pp_has_last_stage else None
            self.pp_schedule.step(
                *args, **kwargs, target=target, losses=losses, return_outputs=False
            )
            if losses is None:
                return torch.tensor([-1.0], device=self.device)
            return torch.sum(torch.stack(losses)).to(self.device)

        parallelism = self.job_config.parallelism
        micro_batches = inputs.shape[0] // parallelism.pipeline_parallel_microbatch_size
        with self.train_context():
            return self.objectives.pipeline_forward_backward(
                run_schedule, micro_batches, global_valid_tokens
            )
