"""The objectives under pipeline parallelism, for every host.

torchtitan cuts the model into stages, each a copy of the model holding some of its
modules. The objectives live on the last stage (they read the final hidden states, the
labels and the head) and score each micro-batch inside the pipeline schedule, as
torchtitan's own loss does. Hidden states they read from earlier modules
(``Requirements.layers``: MTP's embeddings, NITP's target block) are captured on the stage
that holds the module and carried to the last stage as extra stage outputs: a stage
boundary passes ``(hidden, *carried)``, where ``carried`` are the layers made on this or an
earlier stage, in layer order, except the boundary's hidden state itself (the output of
the stage's last block, which the next stage takes as that layer). Carried tensors keep
their autograd graph: gradients through them (MTP's into the embedding) flow back through
the pipeline like the hidden state's.
"""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from titan_objectives.hosts.common.capture import (
    DocumentsOf,
    ForwardCapture,
    HiddenStateTap,
    ModelLayout,
)
from titan_objectives.objective import MeanMetric, ObjectiveOutput, Requirements
from titan_objectives.stack import StackOutput

# torch's schedules that split each backward in an input pass and a weight pass, and
# detach a stage's outputs in place between them.
ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble")


def held_layers(part: nn.Module, layout: ModelLayout, n_layers: int) -> list[int]:
    """The hidden states (0 = embeddings, k = block k) whose modules this stage holds."""
    return [k for k in range(n_layers + 1) if layout.holds_layer(part, k)]


@dataclass(frozen=True)
class StageCarry:
    """Which layers reach one stage beside its input hidden state, and which leave it."""

    receives: tuple[int, ...]
    """Carried in, after the hidden state (the previous stage's ``sends``)."""
    input_layer: int | None
    """The layer the input hidden state is (the previous stage's last block), if read."""
    sends: tuple[int, ...]
    """Carried out after the stage's output hidden state; empty on the last stage."""

    @classmethod
    def plan(
        cls, held: list[int], carried: frozenset[int], last: bool, n_layers: int
    ) -> "StageCarry":
        """For a stage holding the layers ``held`` (consecutive; none: a last stage of
        only the final norm and head) of a pipeline whose last stage reads ``carried``."""
        first = held[0] if held else n_layers + 1
        before = sorted(k for k in carried if k < first)
        input_layer = first - 1 if first > 0 and first - 1 in carried else None
        receives = tuple(k for k in before if k != input_layer)
        if last:
            return cls(receives, input_layer, ())
        upto = held[-1]
        sends = tuple(sorted(k for k in carried if k < upto))
        return cls(receives, input_layer, sends)


class StageTap:
    """The hidden-state hooks of one stage, and its carrying: each forward (one
    micro-batch) starts a new capture, takes the carried layers off its positional
    arguments, and (but on the last stage) appends the layers it sends to its output."""

    def __init__(self, part: nn.Module, tap: HiddenStateTap, carry: StageCarry, copy: bool):
        self.tap, self.carry, self.copy = tap, carry, copy
        # Before the tap's own pre-hook, which records the forward's keyword arguments.
        part.register_forward_pre_hook(self._take_carried, prepend=True)
        if carry.sends:
            part.register_forward_hook(self._append_carried)

    def _take_carried(self, module: nn.Module, args: tuple) -> tuple | None:
        captured = self.tap.new_forward()
        hidden, *carried = args
        if len(carried) != len(self.carry.receives):
            raise RuntimeError(
                f"pipeline stage received {len(carried)} carried hidden states, expected "
                f"layers {self.carry.receives}"
            )
        if captured is not None:
            captured.hidden.update(zip(self.carry.receives, carried, strict=True))
            if self.carry.input_layer is not None:
                captured.hidden[self.carry.input_layer] = hidden
        return (hidden,) if carried else None

    def _append_carried(self, module: nn.Module, args: tuple, output: torch.Tensor) -> tuple:
        captured = self.tap.current
        if captured is None:
            raise RuntimeError("a pipeline stage ran with the objectives' capture not armed")
        carried = [captured.hidden[k] for k in self.carry.sends]
        if self.copy:
            # Zero-bubble schedules detach a stage's outputs in place after their input
            # pass, which must not reach tensors other modules saved for their backward
            # (activation checkpointing keeps a block's input, e.g. the embeddings MTP
            # reads) or views.
            carried = [hidden.clone() for hidden in carried]
        return (output, *carried)


def _detached(output: StackOutput) -> StackOutput:
    """What metrics and the non-finite guard keep of a micro-batch (no autograd graph)."""
    outputs = {
        name: ObjectiveOutput(
            out.loss_sum.detach(),
            {k: MeanMetric(m.total.detach(), m.count.detach()) for k, m in out.metrics.items()},
        )
        for name, out in output.outputs.items()
    }
    return StackOutput(output.weighted_loss_sum.detach(), outputs)


class PipelineTaps:
    """The hooks of every stage this rank holds (``parts``, torchtitan's model parts), and
    the scored micro-batches of the schedule step under way."""

    def __init__(
        self,
        parts: list[nn.Module],
        layout: ModelLayout,
        needs: Requirements,
        documents_of: DocumentsOf | None,
        n_layers: int,
        schedule: str,
    ):
        self.stages: list[StageTap] = []
        self.last: StageTap | None = None
        zero_bubble = schedule in ZERO_BUBBLE_SCHEDULES
        for part in parts:
            last = layout.holds_output_head(part)  # the model's last module
            held = held_layers(part, layout, n_layers)
            carry = StageCarry.plan(held, needs.layers, last, n_layers)
            tap = HiddenStateTap(part, layout, needs, documents_of)
            self.stages.append(StageTap(part, tap, carry, copy=zero_bubble))
            if last:
                self.last = self.stages[-1]
        self.scored: list[tuple[StackOutput, torch.Tensor]] = []
        self.held: list[tuple[ForwardCapture, torch.Tensor]] = []

    @contextmanager
    def capture(self, keep_logits: bool = False) -> Iterator[None]:
        """Around schedule steps (a training batch, or a validation pass): every stage
        forward records into a new capture; the scored micro-batches start afresh."""
        self.scored, self.held = [], []
        with ExitStack() as stack:
            for stage in self.stages:
                stack.enter_context(stage.tap.capture(keep_logits))
            yield

    def last_capture(self) -> ForwardCapture:
        """The last stage's capture of the micro-batch being scored (the schedules score
        a micro-batch right after its forward on the last stage)."""
        captured = self.last.tap.current if self.last else None
        if captured is None:
            raise RuntimeError("the objectives' loss ran on a rank without the last stage")
        return captured

    def keep(
        self, output: StackOutput, captured: ForwardCapture, labels: torch.Tensor, sample: bool
    ) -> None:
        """What is kept of a scored micro-batch: its detached losses and metrics with its
        labels, and (``sample``: for the geometry) the first two's hidden states."""
        self.scored.append((_detached(output), labels))
        if sample and len(self.held) < 2:
            hidden = {key: value.detach() for key, value in captured.hidden.items()}
            self.held.append((ForwardCapture(hidden=hidden), labels))

    def scored_micro_batches(
        self, per_step: int
    ) -> tuple[list[tuple[StackOutput, torch.Tensor]], tuple[ForwardCapture, torch.Tensor] | None]:
        """The real micro-batches scored since ``capture`` began, each schedule step
        having ``per_step`` of them (at least 2: one per stage), with the first one's held
        capture: a schedule's first step after a switch between training and evaluation
        first scores its metadata inference's made-up inputs (torch 2.13 and later)."""
        made_up = len(self.scored) % per_step
        first = self.held[made_up] if made_up < len(self.held) else None
        return self.scored[made_up:], first


class PipelineLoss:
    """The loss function torchtitan's pipeline schedule calls on the last stage, once per
    micro-batch: the objective runtime's, bound once the runtime exists (the schedule is
    built with the model, before it)."""

    def __init__(self) -> None:
        self.score: Any = None

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.score is None:
            raise RuntimeError("the objectives' pipeline loss ran before the runtime existed")
        return self.score(pred, labels)
