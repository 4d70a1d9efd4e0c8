"""What an objective is: the contract between a loss term and the training loop.

An objective is an ``nn.Module`` so that whatever it owns (a projector, MTP blocks) is
part of the model: the optimizer, FSDP2, ``torch.compile`` and checkpoints see it without
special cases. It knows nothing of torchtitan, parallelism or logging: it receives plain
tensors and returns a *sum* over valid positions, so that the caller can normalize every
term by the same global token count, exactly as torchtitan does for cross-entropy.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

# torch's default ignore index, which torchtitan also uses for padded labels.
IGNORE_INDEX = -100


class OptionError(ValueError):
    """An option has a value the objective cannot use.

    ``option`` is the field name; the config layer prefixes the TOML section so that the
    final message names the full key (``objectives.nitp.target_layer``).
    """

    def __init__(self, option: str, value: Any, allowed: str):
        self.option, self.value, self.allowed = option, value, allowed
        super().__init__(f"{option} = {value!r} is not allowed; expected {allowed}")


@dataclass(frozen=True)
class ModelInfo:
    """The few facts about the trunk that objectives may size themselves from."""

    dim: int
    n_layers: int
    vocab_size: int


@dataclass
class ObjectiveOptions:
    """Options every objective has. Subclass it to add an objective's own options;
    each field's docstring is its help text in ``--help`` and ``titan-objectives list``."""

    weight: float = 1.0
    """Multiplier of this objective's loss in the total (lambda). Must be finite and >= 0."""

    def validate(self, model: ModelInfo) -> None:
        """Check values against the model; raise ``OptionError`` for a bad one."""
        if not math.isfinite(self.weight) or self.weight < 0:
            raise OptionError("weight", self.weight, "a finite number >= 0")


@dataclass(frozen=True)
class Requirements:
    """Which tensors of the forward pass an objective reads.

    ``layers`` uses the paper's numbering: 0 is the embedding output, k >= 1 is the
    output of transformer block k (counted from 1).
    """

    logits: bool = False
    final_hidden: bool = False
    layers: frozenset[int] = frozenset()

    def __or__(self, other: "Requirements") -> "Requirements":
        return Requirements(
            logits=self.logits or other.logits,
            final_hidden=self.final_hidden or other.final_hidden,
            layers=self.layers | other.layers,
        )


@dataclass
class Features:
    """One micro-batch's tensors, as the objectives receive them.

    ``labels`` are the next-token targets (``labels[:, t]`` is the token at ``t + 1``),
    with ``IGNORE_INDEX`` where there is nothing to predict. ``final_hidden`` is the LM
    head's input (after the final norm); ``layers`` follows ``Requirements.layers``.
    """

    labels: torch.Tensor
    logits: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None
    layers: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class MeanMetric:
    """A metric kept as (sum, count) so it averages correctly over micro-batches and ranks."""

    total: torch.Tensor
    count: torch.Tensor


@dataclass
class ObjectiveOutput:
    """``loss_sum`` is summed (not averaged) over the positions the objective scores."""

    loss_sum: torch.Tensor
    metrics: dict[str, MeanMetric] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class of a loss term. Subclasses set ``Options`` and implement ``forward``.

    ``name`` is filled in by the registry. Modules created in ``__init__`` are built on
    whatever device is current (torchtitan uses ``meta``); ``init_weights`` gives them
    values after they are materialized, and must also work on sharded (DTensor) params.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions

    def __init__(self, options: ObjectiveOptions, model: ModelInfo):
        super().__init__()
        self.options = options
        self.model_info = model

    def requirements(self) -> Requirements:
        raise NotImplementedError

    def init_weights(self) -> None:
        """Initialize owned parameters. Objectives without parameters need not override."""

    def forward(self, features: Features) -> ObjectiveOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(
            f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options)
        )
