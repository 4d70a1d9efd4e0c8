"""torchtitan's Trainer, with the loss computed by the objective stack."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torchtitan.protocols.train_spec as train_spec_module
from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from titan_objectives.hosts.common import checkpoint_state, moe_balance
from titan_objectives.hosts.common.capture import HiddenStateTap
from titan_objectives.hosts.common.geometry_probe import (
    GeometryProbe,
    build_probe,
    log_measurement,
)
from titan_objectives.hosts.common.nonfinite import NonFiniteGuard
from titan_objectives.hosts.common.running_metrics import ObjectiveMetrics
from titan_objectives.hosts.torchtitan_0_2.model_adapter import documents_of
from titan_objectives.hosts.torchtitan_0_2.preflight import check_job_config
from titan_objectives.hosts.torchtitan_0_2.spec import wrap_train_spec
from titan_objectives.hosts.torchtitan_0_2.validation import ObjectiveValidator
from titan_objectives.objective import IGNORE_INDEX, Requirements
from titan_objectives.sequence import SequenceShards
from titan_objectives.stack import ObjectiveStack


@contextmanager
def _train_spec_override(name: str, spec: train_spec_module.TrainSpec) -> Iterator[None]:
    """Serve ``spec`` for ``name`` while the Trainer builds itself. torchtitan looks at
    user registrations before its own models, so the config keeps the model's real name."""
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
    objective_stack: ObjectiveStack
    objective_metrics: ObjectiveMetrics
    hidden_states: HiddenStateTap

    def __init__(self, job_config: Any):
        checked = check_job_config(job_config)
        self.pipeline_passthrough = job_config.parallelism.pipeline_parallel_degree > 1
        if self.pipeline_passthrough:
            # Preflight lets only a plain ntp stack through: it is torchtitan's own loss,
            # computed inside its pipeline schedule, so the Trainer runs untouched.
            logger.info(
                "Pipeline parallel with a plain ntp stack: torchtitan's own training step "
                "(no objectives/* metrics)"
            )
            super().__init__(job_config)
            return
        name = job_config.model.name
        spec = wrap_train_spec(
            train_spec_module.get_train_spec(name), checked.adapter, checked.options
        )
        with _train_spec_override(name, spec):
            super().__init__(job_config)

        model = self.model_parts[0]
        self.objective_stack = model.objectives
        self.objective_metrics = ObjectiveMetrics(self.objective_stack.weights())
        self.metrics_processor.objective_metrics = self.objective_metrics
        # The ranks whose losses add up to the global one (data and context parallel).
        loss_mesh = (
            self.parallel_dims.get_optional_mesh("loss")
            if self.parallel_dims.dp_cp_enabled
            else None
        )
        self.metrics_processor.objective_mesh = loss_mesh
        # torchtitan's tensor parallelism is sequence parallel: hidden states are shards.
        self.sequence = SequenceShards(
            self.parallel_dims.get_mesh("tp") if self.parallel_dims.tp_enabled else None
        )
        self.geometry, self.geometry_freq = self._build_geometry(checked, job_config)
        needs = self.objective_stack.requirements()
        if self.geometry is not None:
            needs = needs | Requirements(
                final_hidden=True, layers=frozenset(self.geometry.keys[1:])
            )
        eos_id = self.tokenizer.eos_id if self.tokenizer else None
        self.hidden_states = HiddenStateTap(
            model, checked.adapter, needs, documents_of(model.model_args, eos_id)
        )
        if isinstance(getattr(self, "validator", None), ObjectiveValidator):
            self.validator.attach(
                self.hidden_states, self.objective_stack, self.geometry,
                loss_mesh, self.sequence,
            )  # fmt: skip
        checkpoint_state.install(self.checkpointer)
        if self.train_spec.build_optimizers_fn is build_optimizers_with_moe_load_balancing:
            # Balance the objectives' own routers exactly when torchtitan balances the trunk's.
            moe_balance.install(
                self.optimizers, self.objective_stack, [loss_mesh] if loss_mesh else []
            )
        self.nonfinite: NonFiniteGuard | None = None
        if checked.nonfinite != "off":
            self.nonfinite = NonFiniteGuard(
                list(self.objective_stack), checked.nonfinite, self.optimizers, loss_mesh,
                self.device,
            )  # fmt: skip

    def _build_geometry(self, checked: Any, job_config: Any) -> tuple[GeometryProbe | None, int]:
        options = checked.geometry
        if not options.freq and not job_config.validation.enable:
            return None, 0
        probe = build_probe(
            options, self.objective_stack.requirements().geometry_layers,
            checked.model_info.dim, self.parallel_dims, self.metrics_processor.objective_mesh,
            self.sequence,
        )  # fmt: skip
        return probe, options.freq

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
        super().train_step(data_iterator)
        if self._geometry_due():
            log_measurement(self.geometry, self.step, self.metrics_processor.logger)
        last_step = self.step == self.job_config.training.steps
        if self.nonfinite is not None and (
            self.metrics_processor.should_log(self.step) or last_step
        ):
            self.nonfinite.report()  # read with the metrics: no sync on other steps

    def forward_backward_step(
        self,
        *,
        input_dict: dict[str, torch.Tensor],
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
    ) -> torch.Tensor:
        if self.pipeline_passthrough:
            return super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
        inputs, labels, extra_inputs, extra_kwargs = self.post_dataloading_process(
            input_dict, labels
        )
        model = self.model_parts[0]
        with self.train_context():
            with self.maybe_enable_amp:
                with self.hidden_states.capture() as captured:
                    logits = model(inputs, **extra_inputs, **extra_kwargs)
                if self._geometry_due() and not self._geometry_sampled:
                    valid = labels != IGNORE_INDEX
                    self.geometry.take_sample(captured.hidden, seed=self.step, valid=valid)
                    self._geometry_sampled = True
                features = captured.features(labels, logits, self.sequence)
                output = self.objective_stack(features)
                loss = output.weighted_loss_sum / global_valid_tokens
            # Free the logits and hidden states before backward, as torchtitan does.
            del logits, features, captured
            loss.backward()

        self.objective_metrics.add(output, global_valid_tokens)
        if self.nonfinite is not None:
            self.nonfinite.record([out.loss_sum for out in output.outputs.values()])
        return loss
