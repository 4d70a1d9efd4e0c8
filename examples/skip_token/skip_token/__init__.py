"""``skip_token``: cross-entropy of ``labels[:, t + offset]`` (the token ``offset``
positions past the next one) from ``head(norm(silu(projection(h_t))))``, with a projection
and a vocabulary-sized head of its own, dropped at export.

What it shows a plugin author: modules of its own (initialized in ``init_weights``, split
under tensor parallelism by ``tensor_parallel_plan``), labels read ahead (declared by
``lookahead``, masked at document ends), the head's cross-entropy on the chunked engine
(``losses.linear_cross_entropy_sum``: no ``[tokens, vocab]`` logits, the head split over
the vocabulary under TP), and metrics summed across sequence shards.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, SequenceParallel

from titan_objectives import (
    IGNORE_INDEX,
    Features,
    MeanMetric,
    ModelInfo,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    OptionError,
    Requirements,
    losses,
)
from titan_objectives.sequence import shift_left


@dataclass
class SkipTokenOptions(ObjectiveOptions):
    offset: int = 2
    """Predict labels[t + offset], the token offset positions past the next one."""

    chunk_size: int = 1024
    """Tokens per chunk of the head's cross-entropy."""

    def validate(self, model: ModelInfo) -> None:
        super().validate(model)
        if not 1 <= self.offset < model.seq_len:
            raise OptionError("offset", self.offset, f"an integer in 1..{model.seq_len - 1}")
        if self.chunk_size < 1:
            raise OptionError("chunk_size", self.chunk_size, "an integer >= 1")


class SkipToken(Objective):
    """Cross-entropy of the token offset positions past the next one, through a projection
    and a vocabulary-sized head of its own."""

    Options = SkipTokenOptions
    options: SkipTokenOptions
    sequence_parallel = True  # shifts labels (whole), sums through features.sequence

    def __init__(self, options: SkipTokenOptions, model: ModelInfo):
        super().__init__(options, model)
        self.projection = nn.Linear(model.dim, model.dim, bias=False)
        self.norm = nn.RMSNorm(model.dim, eps=model.norm_eps)
        self.head = nn.Linear(model.dim, model.vocab_size, bias=False)

    def requirements(self) -> Requirements:
        # labels[t + offset] only: hidden states are read at t, so any sequence shard will do.
        return Requirements(final_hidden=True, lookahead=self.options.offset, hidden_lookahead=0)

    def init_weights(self) -> None:
        std = self.model_info.dim**-0.5
        for linear in (self.projection, self.head):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        self.norm.reset_parameters()

    def tensor_parallel_plan(self) -> dict[str, ParallelStyle]:
        # Per-position modules: weights replicated, run on sequence shards (their gradients
        # are reduced over the group). The head: rows split over the vocabulary, read by the
        # chunked cross-entropy (never called as a module).
        per_position = SequenceParallel(use_local_output=True)
        return {"projection": per_position, "norm": per_position, "head": ColwiseParallel()}

    def forward(self, features: Features) -> ObjectiveOutput:
        offset, sequence = self.options.offset, features.sequence
        hidden = self.norm(F.silu(self.projection(features.final_hidden)))
        targets = shift_left(features.labels, offset, IGNORE_INDEX)
        targets = targets.masked_fill(~features.within_document(offset), IGNORE_INDEX)
        loss_sum = losses.linear_cross_entropy_sum(
            hidden, self.head.weight, targets, self.options.chunk_size, "auto", sequence
        )
        # Metrics: sums over this rank's positions, added up across sequence shards.
        scored = sequence.local(targets != IGNORE_INDEX)
        rms = hidden.float().pow(2).mean(-1).sqrt()
        positions = torch.tensor(float(scored.numel()), device=scored.device)
        return ObjectiveOutput(
            loss_sum,
            {
                "scored": MeanMetric(sequence.sum(scored.sum().float()), sequence.sum(positions)),
                "hidden_rms": MeanMetric(
                    sequence.sum(torch.where(scored, rms, 0.0).sum()),
                    sequence.sum(scored.sum().float()),
                ),
            },
        )
