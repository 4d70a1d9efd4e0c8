"""``top``: Token Order Prediction (Zuhri et al., arXiv 2508.19228).

A second unembedding, the TOP head (``[vocab, dim]``, training-only), learns to rank the
tokens of the next W positions by how soon each comes. At position t a token whose next
occurrence is d positions ahead (d = 1 for the next token) scores ``W - d``; tokens absent
from the window score ``-inf``. The loss is ListNet, the cross-entropy between the
softmax of those scores and the softmax of the head's logits ``z_t``:

    L_TOP = sum_t [ logsumexp(z_t) - sum_{v in window} softmax(y_t)_v z_{t,v} ]

At most W tokens have a finite score, so the targets are W (token, probability) pairs
per position, built without a loop over positions, and the loss runs on the chunked
cross-entropy engine: neither ``[tokens, vocab]`` logits nor targets ever exist.

Choices of ours, where the paper's reference code (``seq_to_top``) differs or could not
be checked here: the window holds the next W labels (the reference scores W + 1 of them,
distances 0 to W; after the softmax, which ignores a common shift, only that one extra
token differs); under block-causal attention a window stops at the end of t's document;
the head starts like torchtitan's own output head (truncated normal, std ``dim**-0.5``),
or as a copy of it (``head_init = "output"``).
"""

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from titan_objectives.losses import linear_sparse_cross_entropy_sum
from titan_objectives.objective import (
    IGNORE_INDEX,
    Features,
    MeanMetric,
    ModelInfo,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    OptionError,
    Requirements,
)

logger = logging.getLogger(__name__)

HeadInit = Literal["normal", "output"]


@dataclass
class TOPOptions(ObjectiveOptions):
    window: int = 1024
    """W: how many upcoming tokens are ranked; the next token scores W - 1, the one W
    positions ahead 0. After the softmax the scores weigh e^-d: tokens past ~20 positions
    carry almost no mass, so W mostly decides which tokens count as upcoming at all."""

    chunk_size: int = 4096
    """Tokens per chunk of the loss (each chunk holds [chunk, vocab] fp32 logits); 0: all
    tokens of the micro-batch at once."""

    head_init: HeadInit = "normal"
    """The TOP head's initialization: 'normal' (as torchtitan initializes its output head:
    truncated normal, std dim^-0.5) or 'output' (a copy of the model's output head)."""

    def validate(self, model: ModelInfo) -> None:
        super().validate(model)
        if self.window < 1:
            raise OptionError("window", self.window, "an integer >= 1")
        if self.window > model.seq_len:
            logger.warning(
                f"top.window = {self.window} is longer than the sequence ({model.seq_len} "
                f"positions): a window past the sequence changes nothing; {model.seq_len} is used"
            )
        if self.chunk_size < 0:
            raise OptionError("chunk_size", self.chunk_size, "0 (all at once) or tokens > 0")


def _windows(x: torch.Tensor, window: int, fill: int) -> torch.Tensor:
    """``[batch, seq, W]``: ``out[:, t, j] = x[:, t + j]``, ``fill`` past the end."""
    return F.pad(x, (0, window - 1), value=fill).unfold(1, window, 1)


def top_targets(
    labels: torch.Tensor, window: int, documents: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """TOP's target distributions, sparsely: ``(ids, probs)``, each ``[batch, seq, W]``.

    ``labels[:, t + j]`` is the token ``j + 1`` positions after t. Entry j of position t
    holds that token with probability ``softmax(W - d)`` over the first occurrence of each
    distinct token in the window; later repeats, ignored labels, positions past the end
    and, with ``documents`` (block-causal masks), labels at positions of another document
    than t's get 0. A position with nothing in its window has all zeros.
    """
    ids = _windows(labels, window, IGNORE_INDEX)
    valid = ids != IGNORE_INDEX
    if documents is not None:
        valid &= _windows(documents, window, -1) == documents[..., None]
    # The first occurrence of each token: after a stable sort of the window's ids (invalid
    # entries sent past every token), the first entry of each run of equal ids.
    keys = torch.where(valid, ids, torch.iinfo(ids.dtype).max)
    sorted_keys, order = torch.sort(keys, dim=-1, stable=True)
    starts_run = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts_run[..., 1:] = sorted_keys[..., 1:] != sorted_keys[..., :-1]
    first = torch.zeros_like(valid).scatter(-1, order, starts_run) & valid
    distance = torch.arange(1, window + 1, device=labels.device, dtype=torch.float32)
    scores = torch.where(first, window - distance, float("-inf"))
    any_scored = first.any(dim=-1, keepdim=True)
    probs = torch.where(any_scored, torch.softmax(scores, dim=-1), 0.0)
    return torch.where(first, ids, 0), probs


class TokenOrderPrediction(Objective):
    """Token Order Prediction: a second unembedding ranks the next W tokens by how soon
    each comes (ListNet loss; Zuhri et al. 2025)."""

    Options = TOPOptions
    options: TOPOptions
    # The head's logits are computed for the whole sequence against this rank's rows of
    # the head (split over the vocabulary like the model's); targets come from labels.
    sequence_parallel = True

    def __init__(self, options: TOPOptions, model: ModelInfo):
        super().__init__(options, model)
        self.shared = model.shared
        self.head = nn.Linear(model.dim, model.vocab_size, bias=False)
        # A window past the sequence ranks nothing more.
        self.window = min(options.window, model.seq_len)

    def requirements(self) -> Requirements:
        # Its own head: the model's is only read at init (head_init = 'output'). It reads
        # labels W ahead, but hidden states at t only: any sequence shard will do.
        return Requirements(final_hidden=True, lookahead=self.window - 1, hidden_lookahead=0)

    def init_weights(self) -> None:
        if self.options.head_init == "output":
            with torch.no_grad():
                self.head.weight.copy_(self.shared.output_weight())
            return
        std = self.model_info.dim**-0.5
        nn.init.trunc_normal_(self.head.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def tensor_parallel_plan(self) -> dict[str, ParallelStyle]:
        # Rows split over the vocabulary, like torchtitan's own head; only the weight is
        # used (by the chunked loss), never the module's forward.
        return {"head": ColwiseParallel()}

    def flops_per_token(self) -> int:
        """The head (6 V d, forward and backward) and the window's gathers and scatters."""
        info = self.model_info
        return 6 * info.vocab_size * info.dim + 6 * self.window

    def forward(self, features: Features) -> ObjectiveOutput:
        window = min(self.window, features.labels.shape[1])
        ids, probs = top_targets(features.labels, window, features.documents)
        hidden = features.final_hidden
        chunk = self.options.chunk_size or features.labels.numel()
        loss_sum = linear_sparse_cross_entropy_sum(
            hidden, self.head.weight, ids, probs, chunk, features.sequence
        )
        scored = probs.sum(dim=-1) > 0
        upcoming = (probs > 0).sum(dim=-1).float()
        metrics = {"window_tokens": MeanMetric(upcoming.sum(), scored.sum())}
        return ObjectiveOutput(loss_sum, metrics)
