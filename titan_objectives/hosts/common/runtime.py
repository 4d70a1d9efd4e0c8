"""The objectives' part of a training run, written once for every host.

A host's trainer hands its step to ``ObjectiveRuntime``: capture the hidden states the
stack needs during the model's forward, give them to the stack, divide the weighted sum by
the global valid-token count as torchtitan does, run backward, then keep the metrics and
the non-finite flags on the device. What a host provides is named in ``Host``.
"""

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan_objectives.config import GeometryOptions
from titan_objectives.hosts.common.capture import DocumentsOf, HiddenStateTap, ModelLayout
from titan_objectives.hosts.common.geometry_probe import GeometryHook
from titan_objectives.hosts.common.nonfinite import NonFiniteGuard
from titan_objectives.hosts.common.pipeline import PipelineTaps
from titan_objectives.hosts.common.running_metrics import (
    ObjectiveMetrics,
    StepMetrics,
    ValidationTotals,
)
from titan_objectives.objective import ModelInfo, ObjectiveOptions, SharedModules
from titan_objectives.sequence import ContextLayout, SequenceShards
from titan_objectives.stack import ObjectiveStack, StackOutput

logger = logging.getLogger(__name__)


class HostSharedModules(SharedModules, Protocol):
    """A host's ``SharedModules``: made before the model exists (the stack is built then),
    bound to the live model once it does, told when tensor parallelism splits it."""

    def bind(self, model: nn.Module) -> None: ...

    def block_class(self) -> type[nn.Module]:
        """The class of the model's blocks (and of ``new_block``'s)."""
        ...

    def use_tensor_parallel(self, tp_mesh: DeviceMesh, loss_parallel: bool) -> None: ...


@dataclass
class CheckedConfig:
    """What a host's ``check_config`` hands to its trainer, validated."""

    model_info: ModelInfo
    stack: ObjectiveStack
    """The stacked objectives, built once on the meta device in the model's dtype; the
    trainer attaches this very module to the model."""
    nonfinite: str
    geometry: GeometryOptions
    pipeline_schedule: str = "1F1B"
    """``parallelism.pipeline_parallel_schedule`` (used under pipeline parallelism)."""

    @property
    def shared(self) -> HostSharedModules:
        """The model's modules the objectives were built with (``model_info.shared``)."""
        return self.model_info.shared

    @property
    def options(self) -> dict[str, ObjectiveOptions]:
        """Each stacked objective's checked options, in stack order."""
        return self.stack.options()


class Host(Protocol):
    """What differs between torchtitan releases, as the runtime asks for it. Each host's
    trainer implements it; both releases name ``parallel_dims`` and its meshes alike."""

    parallel_dims: Any
    device: torch.device

    def model_layout(self) -> ModelLayout:
        """Where the model keeps its embeddings, blocks, final norm and output head."""
        ...

    def documents_of(self) -> DocumentsOf | None:
        """How a forward's packed documents are found from the model's arguments."""
        ...

    def loss_context(self) -> contextlib.AbstractContextManager:
        """What the loss must run in that the host's own contexts do not give (torch's
        ``loss_parallel`` for vocabulary-sharded logits), training and validation."""
        ...

    def context_layout(self) -> ContextLayout | None:
        """Under context parallelism, which positions of a sequence this rank's group
        holds, as the host's torchtitan shards inputs and labels; None without."""
        ...


def whole_sequence_documents(
    documents_of: DocumentsOf | None, sequence: SequenceShards
) -> DocumentsOf | None:
    """``documents_of`` on the whole sequence: under context parallelism the model runs on
    this rank's positions, and a document index counts documents from the start."""
    if documents_of is None or sequence.context is None:
        return documents_of

    def whole(value: Any) -> Any:
        per_position = isinstance(value, torch.Tensor) and value.dim() == 2
        return sequence.whole(value) if per_position and not value.is_floating_point() else value

    return lambda args, kwargs: documents_of(
        tuple(map(whole, args)), {key: whole(value) for key, value in kwargs.items()}
    )


def context_layout(
    parallel_dims: Any, load_balancer: str | None, cp_shard: Callable[..., Any], device: Any
) -> ContextLayout | None:
    """The layout torchtitan's ``cp_shard`` (0.2.2 and 0.3 alike) gives a sequence under
    context parallelism: it is asked to shard the positions themselves."""
    if not parallel_dims.cp_enabled:
        return None
    mesh = parallel_dims.get_mesh("cp")

    def positions_of(length: int) -> torch.Tensor:
        (positions,), _ = cp_shard(
            mesh, (torch.arange(length, device=device)[None],), None, load_balancer
        )
        return positions[0]

    return ContextLayout(mesh, positions_of)


def loss_mesh(parallel_dims: Any) -> DeviceMesh | None:
    """The ranks whose losses add up to the global one (data and context parallel)."""
    return parallel_dims.get_optional_mesh("loss") if parallel_dims.dp_cp_enabled else None


class ObjectiveRuntime:
    """The stack's training step, metrics, geometry, non-finite guard and validation
    scoring, for the model parts this rank holds (``parts``: the model, or under pipeline
    parallelism this rank's stages, the last of which holds ``model.objectives``)."""

    def __init__(
        self,
        host: Host,
        checked: CheckedConfig,
        parts: list[nn.Module],
        optimizers: Any,
        validation: bool,
    ):
        dims = host.parallel_dims
        self.stack = checked.stack
        self.needs = self.stack.requirements()
        self.loss_context = host.loss_context
        self.loss_mesh = loss_mesh(dims)
        # torchtitan's tensor parallelism is sequence parallel, its context parallelism
        # splits sequences into chunks: objectives get shards, and cross them through this.
        self.sequence = SequenceShards(
            dims.get_mesh("tp") if dims.tp_enabled else None, host.context_layout()
        )
        self.metrics = ObjectiveMetrics()
        self.geometry = GeometryHook.build(
            checked.geometry,
            self.needs.geometry_layers,
            checked.model_info.dim,
            dims,
            self.loss_mesh,
            self.sequence,
            validation,
        )
        needs = self.needs | self.geometry.requirements()
        documents_of = whole_sequence_documents(host.documents_of(), self.sequence)
        self.pipeline: PipelineTaps | None = None
        self._global_valid_tokens: torch.Tensor | None = None
        self._micro_batches = 0  # per pipeline schedule step, once one has run
        self._validation_loss: Callable[..., torch.Tensor] | None = None
        if dims.pp_enabled:
            n_layers = checked.model_info.n_layers
            self.pipeline = PipelineTaps(
                parts,
                host.model_layout(),
                needs,
                documents_of,
                n_layers,
                checked.pipeline_schedule,
            )
        else:
            (model,) = parts
            self.hidden_states = HiddenStateTap(model, host.model_layout(), needs, documents_of)
        self.nonfinite: NonFiniteGuard | None = None
        if checked.nonfinite != "off":
            # Under pipeline parallelism only the last stage scores: every stage follows it.
            guard_group = dist.group.WORLD if dims.pp_enabled else self.loss_mesh
            self.nonfinite = NonFiniteGuard(
                list(self.stack), checked.nonfinite, optimizers, guard_group, host.device
            )

    def start_step(self, step: int) -> None:
        """Before a training step's first micro-batch."""
        if self.nonfinite is not None:
            self.nonfinite.start_step(step)
        self.geometry.start_step(step)
        self.stack.set_step(step)
        self.metrics.reset(self.stack.weights())

    def forward_backward(
        self,
        run_model: Callable[[], torch.Tensor],
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
        autocast: contextlib.AbstractContextManager | None = None,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    ) -> torch.Tensor:
        """One micro-batch: ``run_model()`` is the model's forward (its logits, or its
        final hidden states when nothing reads the logits), ``labels`` as the host's
        torchtitan gives them (under context parallelism, this rank's positions: the
        objectives get them whole); returns the loss torchtitan reports (this rank's
        weighted sum / global valid tokens)."""
        labels = self.sequence.whole(labels)
        with self.loss_context():
            with autocast or contextlib.nullcontext():
                with self.hidden_states.capture() as captured:
                    pred = run_model()
                self.geometry.sample_training(captured, labels)
                output = self.score(captured, pred, labels)
                loss = output.weighted_loss_sum / global_valid_tokens
            # Free the logits and hidden states before backward, as torchtitan does.
            del pred, captured
            backward(loss)
        self._record(output, global_valid_tokens)
        return loss

    def _record(self, output: StackOutput, global_valid_tokens: torch.Tensor) -> None:
        """One micro-batch's metrics and non-finite flags."""
        self.metrics.add(output, global_valid_tokens)
        if self.nonfinite is not None:
            self.nonfinite.record([out.loss_sum for out in output.outputs.values()])

    def pipeline_forward_backward(
        self,
        run_schedule: Callable[[], torch.Tensor],
        micro_batches: int,
        global_valid_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """One batch of ``micro_batches`` through the host's pipeline step
        (``run_schedule()``, which returns what the host reports), whose schedule calls
        ``pipeline_loss`` on the last stage for each micro-batch."""
        assert self.pipeline is not None
        self._global_valid_tokens = global_valid_tokens
        self._micro_batches = micro_batches
        # The loss context holds the schedule's backward too (torch's loss_parallel).
        with self.pipeline.capture(), self.loss_context():
            loss = run_schedule()
        if self.pipeline.last is not None:
            scored, first = self.pipeline.scored_micro_batches(micro_batches)
            for output, _ in scored:
                self._record(output, global_valid_tokens)
            if first is not None:
                self.geometry.sample_training(*first)
        return loss

    def pipeline_loss(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch's loss on the last stage, right after its forward there: the
        stack on the stage's capture, divided by the step's global valid tokens as the
        one-process step divides it (torchtitan 0.2.2's own pipeline loss is not). During
        validation, the validator's loss (``validation``)."""
        if self._validation_loss is not None:
            return self._validation_loss(pred, labels)
        assert self._global_valid_tokens is not None
        # In ``pipeline_forward_backward``'s loss context (torch's loss_parallel is not
        # re-entrant: leaving an inner one would drop it before the schedule's backward).
        output = self._score_micro_batch(pred, labels, sample=self.geometry.wants_sample)
        return output.weighted_loss_sum / self._global_valid_tokens

    def _score_micro_batch(
        self, pred: torch.Tensor, labels: torch.Tensor, sample: bool
    ) -> StackOutput:
        """The stack on the last stage's capture of one micro-batch, kept for the totals
        after the schedule's step (``sample``: and for the geometry)."""
        assert self.pipeline is not None
        labels = self.sequence.whole(labels)
        captured = self.pipeline.last_capture()
        output = self.score(captured, pred, labels)
        self.pipeline.keep(output, captured, labels, sample)
        return output

    def score(self, captured: Any, pred: torch.Tensor, labels: torch.Tensor) -> StackOutput:
        """The stack on one forward's capture; training and validation alike."""
        logits = pred if self.needs.logits else None
        return self.stack(captured.features(labels, logits, self.sequence))

    def end_step(self, step: int, logs_now: bool, metrics_logger: Any) -> None:
        """After the optimizer step: the geometry of a measured step to ``metrics_logger``
        and, on logging steps, the non-finite report (which reads the device)."""
        self.geometry.log_training(step, metrics_logger)
        if self.nonfinite is not None and logs_now:
            self.nonfinite.report()

    def reduced_metrics(self) -> StepMetrics:
        """This step's objective values over all ranks (``ObjectiveMetricsLogging``)."""
        return self.metrics.reduce(self.loss_mesh)

    @contextlib.contextmanager
    def validation(
        self,
        step: int,
        metrics_logger: Any,
        keep_logits: bool = False,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        """Around a torchtitan validation pass: yields a function that scores one batch
        (``score(pred, labels) -> StackOutput``) from the forward just run; logs every
        objective's validation loss and the geometry afterwards. Under pipeline
        parallelism the schedule's loss function is ``loss`` meanwhile (the validator's,
        which scores), and the batches' micro-batches are totalled after the pass."""
        totals = ValidationTotals()
        self.geometry.start_validation()
        if self.pipeline is None:
            with torch.no_grad(), self.hidden_states.capture(keep_logits=keep_logits) as captured:

                def score(pred: torch.Tensor, labels: torch.Tensor) -> StackOutput:
                    labels = self.sequence.whole(labels)
                    self.geometry.sample_validation(captured, labels, step)
                    with self.loss_context():
                        output = self.score(captured, pred, labels)
                    totals.add(output, self.sequence.in_group(labels))  # this group's tokens
                    return output

                yield score
        else:
            with torch.no_grad(), self.pipeline.capture(keep_logits=keep_logits):
                self._validation_loss = loss
                try:
                    yield self._score_pipeline_validation
                finally:
                    self._validation_loss = None
            if self.pipeline.last is not None:
                scored, first = self.pipeline.scored_micro_batches(self._micro_batches)
                for output, labels in scored:
                    totals.add(output, self.sequence.in_group(labels))
                if first is not None:
                    self.geometry.sample_validation(*first, step)
        logged = totals.reduce(self.loss_mesh)
        logged.update(self.geometry.validation_values(step))
        metrics_logger.log(logged, step)

    def _score_pipeline_validation(self, pred: torch.Tensor, labels: torch.Tensor) -> StackOutput:
        """A validation micro-batch on the last stage (totalled after the pass)."""
        with self.loss_context():
            return self._score_micro_batch(pred, labels, sample=True)
