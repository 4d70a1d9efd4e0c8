"""What an objective is: the contract between a loss term and the training loop.

An objective is an ``nn.Module`` so that whatever it owns (a projector, MTP blocks) is
part of the model: the optimizer, FSDP2, ``torch.compile`` and checkpoints see it without
special cases. It knows nothing of torchtitan or logging: it receives plain tensors and
returns a *sum* over valid positions, so that the caller can normalize every term by the
same global token count, exactly as torchtitan does for cross-entropy. Under sequence
parallelism the tensors are one rank's positions (see ``sequence.py``); an objective that
handles that declares ``sequence_parallel = True``.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from titan_objectives.sequence import UNSHARDED, SequenceShards, shift_left

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


class SharedModules(Protocol):
    """The model's own pieces an objective may reuse: weights are shared, never copied.

    Implemented per model family by each host (``titan_objectives.hosts``), so objectives
    never import a model class. Use them only inside ``forward`` (they are materialized
    and possibly sharded after the objective is built)."""

    def output_weight(self) -> torch.Tensor:
        """The LM head's ``[vocab, dim]`` weight, as the forward pass just used it."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head applied to ``[batch, seq, dim]`` hidden states (this rank's
        positions under sequence parallelism). Under tensor parallelism the result covers
        the whole sequence and may be vocabulary-sharded: give it, with the whole
        sequence's labels, to ``losses.cross_entropy_sum``."""
        ...

    def new_block(self, index: int) -> nn.Module:
        """A fresh transformer block of the model's own kind; ``index`` is its position
        in depth (``n_layers`` for the first block after the trunk), which sets its init."""
        ...

    def init_block(self, block: nn.Module) -> None:
        """Initialize a block from ``new_block`` the way the model initializes its own."""
        ...

    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, context: dict[str, Any]
    ) -> torch.Tensor:
        """Apply a block to ``[batch, seq, dim]`` hidden states, with the model's rotary
        embedding and the trunk's attention masks (``context`` is ``Features.context``)."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """The few facts about the trunk that objectives size themselves from, and (once the
    model exists) the modules they may share with it."""

    dim: int
    n_layers: int
    vocab_size: int
    seq_len: int
    norm_eps: float = 1e-5
    shared: SharedModules | None = field(default=None, compare=False, repr=False)


WeightSchedule = Literal["constant", "linear_warmup", "step"]


@dataclass
class ObjectiveOptions:
    """Options every objective has. Subclass it to add an objective's own options;
    each field's docstring is its help text in ``--help`` and ``titan-objectives list``."""

    weight: float = 1.0
    """Multiplier of this objective's loss in the total (lambda). Must be finite and >= 0."""

    schedule: WeightSchedule = "constant"
    """How the weight follows the training step: 'constant'; 'linear_warmup' (0 to
    `weight` over `warmup_steps`); 'step' (`weight`, then `weight_after` from `switch_step`)."""

    warmup_steps: int = 0
    """Steps of the linear warm-up (schedule = 'linear_warmup')."""

    switch_step: int = 0
    """First step that uses `weight_after` (schedule = 'step')."""

    weight_after: float | None = None
    """Weight from `switch_step` on (schedule = 'step'), e.g. DeepSeek-V3's 0.3 -> 0.1."""

    def validate(self, model: ModelInfo) -> None:
        """Check values against the model; raise ``OptionError`` for a bad one."""
        if not math.isfinite(self.weight) or self.weight < 0:
            raise OptionError("weight", self.weight, "a finite number >= 0")
        if self.schedule == "linear_warmup" and self.warmup_steps < 1:
            raise OptionError(
                "warmup_steps", self.warmup_steps, "an integer >= 1 with schedule = 'linear_warmup'"
            )
        if self.schedule != "linear_warmup" and self.warmup_steps:
            raise OptionError(
                "warmup_steps", self.warmup_steps, "0 unless schedule = 'linear_warmup'"
            )
        if self.schedule != "step" and (self.switch_step or self.weight_after is not None):
            option = "switch_step" if self.switch_step else "weight_after"
            raise OptionError(option, getattr(self, option), "unset unless schedule = 'step'")
        if self.schedule == "step":
            if self.switch_step < 1:
                raise OptionError(
                    "switch_step", self.switch_step, "an integer >= 1 with schedule = 'step'"
                )
            if self.weight_after is None or not (
                math.isfinite(self.weight_after) and self.weight_after >= 0
            ):
                raise OptionError(
                    "weight_after", self.weight_after, "a finite number >= 0 with schedule = 'step'"
                )

    def weight_at(self, step: int) -> float:
        """The weight at training step ``step`` (torchtitan counts steps from 1)."""
        if self.schedule == "linear_warmup":
            return self.weight * min(1.0, step / self.warmup_steps)
        if self.schedule == "step" and step >= self.switch_step:
            return self.weight_after
        return self.weight


@dataclass(frozen=True)
class Requirements:
    """What an objective reads from the forward pass, and what that asks of the loop.

    The trainer and the config checks decide everything from these declarations, never
    from an objective's name, so an objective from another package gets every check and
    feature a built-in gets. ``layers`` uses the paper's numbering: 0 is the embedding
    output, k >= 1 is the output of transformer block k (counted from 1).
    """

    logits: bool = False
    """Reads the model's logits. When no objective does, the model skips them."""

    final_hidden: bool = False
    """Reads the final hidden states (the LM head's input)."""

    layers: frozenset[int] = frozenset()
    """Reads these hidden states (0 = embeddings, k = block k)."""

    lookahead: int = 0
    """The largest k such that position t reads ``labels[:, t + k]``, an input at t + k or
    a hidden state at t + k (NTP 0; NITP 1; MTP its depth D, whose last module scores
    ``labels[:, t + D]``; TOP W - 1, its window being ``labels[:, t .. t + W - 1]``).
    Labels are whole under every parallelism; hidden states follow ``hidden_lookahead``."""

    hidden_lookahead: int | None = None
    """The largest offset at which it reads *hidden states* (``features.sequence.
    shift_left``); under tensor parallelism they are sequence shards, under context
    parallelism chunks, and each run of consecutive positions a rank holds must be at least
    this long. ``None``: the same as ``lookahead``; TOP, which reads only labels ahead,
    declares 0."""

    output_weight: bool = False
    """Reads the LM head's weight outside the model's forward (``SharedModules``): it
    must still be gathered then, so FSDP may not free it right after the forward."""

    whole_vocabulary: bool = False
    """Needs the whole vocabulary on one rank (e.g. a chunked cross-entropy of its own):
    refused under tensor parallelism, which splits the head over the vocabulary."""

    geometry_layers: frozenset[int] = frozenset()
    """Hidden states worth tracking by default in the geometry metrics (NITP: its target
    block), besides the final one."""

    @property
    def shard_reach(self) -> int:
        """How far ahead it reads hidden states (``hidden_lookahead``, or ``lookahead``)."""
        return self.lookahead if self.hidden_lookahead is None else self.hidden_lookahead

    def __or__(self, other: "Requirements") -> "Requirements":
        return Requirements(
            logits=self.logits or other.logits,
            final_hidden=self.final_hidden or other.final_hidden,
            layers=self.layers | other.layers,
            lookahead=max(self.lookahead, other.lookahead),
            hidden_lookahead=max(self.shard_reach, other.shard_reach),
            output_weight=self.output_weight or other.output_weight,
            whole_vocabulary=self.whole_vocabulary or other.whole_vocabulary,
            geometry_layers=self.geometry_layers | other.geometry_layers,
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
    context: dict[str, Any] = field(default_factory=dict)
    """What the trunk's blocks ran with (attention masks): pass it to ``run_block``."""
    documents: torch.Tensor | None = None
    """Under block-causal attention (packed documents), the document index of each input
    position, ``[batch, seq]`` over the whole sequence; ``None`` when every position sees
    all earlier ones. Use ``within_document`` rather than reading it."""
    sequence: SequenceShards = UNSHARDED
    """Which positions the hidden states hold; ``labels`` and ``documents`` always cover
    the whole sequence, ``logits`` the positions of ``sequence.in_group`` (the whole
    sequence but under context parallelism). Shift and sum over positions through it."""

    def within_document(self, k: int) -> torch.Tensor:
        """``[batch, seq]`` bool over the whole sequence: position t may read position
        t + k, which exists and, under block-causal attention, lies in t's document
        (``labels[:, t + k]`` may still be the next document's first token, as it is for
        next-token prediction at a document's last position). Under block-causal masks
        each document is its own sequence: an objective that shifts must not pair
        positions of two documents."""
        batch, length = self.labels.shape[:2]
        positions = torch.arange(length, device=self.labels.device)
        inside = (positions < length - k).expand(batch, length)
        if self.documents is None or k == 0:
            return inside
        return inside & (self.documents == shift_left(self.documents, k, -1))

    def restricted_to(self, needs: Requirements) -> "Features":
        """Only the tensors ``needs`` names. An objective is called with its own view:
        FSDP2 hooks every tensor a unit receives, and a vocabulary-sharded logits DTensor
        passed to a unit that ignores it would get a plain zero gradient in backward."""
        return dataclasses.replace(
            self,
            logits=self.logits if needs.logits else None,
            final_hidden=self.final_hidden if needs.final_hidden else None,
            layers={k: v for k, v in self.layers.items() if k in needs.layers},
        )


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
    sequence_parallel: ClassVar[bool] = False
    """True if ``forward`` is right on sequence-sharded hidden states (it shifts and sums
    over positions through ``Features.sequence``) and ``tensor_parallel_plan`` covers
    every owned parameter. Tensor-parallel jobs refuse objectives that do not say so."""

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

    def checkpoint_activations(self) -> None:
        """Called when the job checkpoints activations (``activation_checkpoint.mode``):
        recompute in backward what is cheap to recompute instead of keeping it. Blocks
        from ``SharedModules.new_block`` are already checkpointed like the trunk's."""

    def tensor_parallel_plan(self) -> dict[str, ParallelStyle]:
        """How to split owned submodules over a tensor-parallel group, as a
        ``parallelize_module`` plan relative to this objective; inputs and outputs are
        sequence shards (``Shard(1)``). Blocks from ``SharedModules.new_block`` are left
        out: the model's own parallelization treats them like its blocks."""
        return {}

    def flops_per_token(self) -> int:
        """Training FLOPs this objective adds per token (forward + backward). The default
        counts 6 per owned parameter, right for objectives made of matmuls applied once
        per token; objectives that reuse the model's modules add those."""
        return 6 * sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return ", ".join(
            f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options)
        )
