"""``nitp``: Next Implicit Token Prediction (arXiv 2605.24956).

The final hidden state at position t, through a projector P, is pulled towards the
stop-gradient output of a shallow block k at position t + 1:

    L_NITP = sum_t d(P(h_t), sg(z^k_{t+1}))        d = 1 - cos by default

The target is what the shallow network makes of the *next* token, so the trunk learns to
represent the token it is about to emit, which keeps the final representations from
collapsing onto the few directions the LM head needs. The projector is training-only.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)
from torch.utils.checkpoint import checkpoint

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

ProjectorKind = Literal["swiglu", "linear", "none"]
DistanceKind = Literal["cosine", "smooth_l1", "mse"]


@dataclass
class NITPOptions(ObjectiveOptions):
    target_layer: int | None = None
    """Block k whose output at t+1 is the target (1-based; 0 = embeddings). Default:
    ceil(0.2 * n_layers), the paper's rule (5 of 24, 6 of 28, 4 of 17 blocks)."""

    projector: ProjectorKind = "swiglu"
    """P: 'swiglu' (d -> 4d -> d, 12 d^2 params), 'linear' (d -> d) or 'none' (identity)."""

    loss: DistanceKind = "cosine"
    """Distance between P(h_t) and the target: 'cosine' (1 - cos), 'smooth_l1' or 'mse'
    (both averaged over the hidden dimension; the paper found MSE diverges)."""

    recompute_projector: bool = False
    """Recompute the projector in backward instead of keeping its activations (for
    'swiglu' three [tokens, 4d] tensors, as much as a feed-forward block): less memory
    for one more projector forward. On by itself when activation checkpointing is on."""

    def validate(self, model: ModelInfo) -> None:
        super().validate(model)
        if self.target_layer is not None and not 0 <= self.target_layer < model.n_layers:
            raise OptionError(
                "target_layer",
                self.target_layer,
                f"an integer in 0..{model.n_layers - 1} for a model with "
                f"{model.n_layers} blocks (0 = embeddings)",
            )

    def resolved_target_layer(self, model: ModelInfo) -> int:
        if self.target_layer is not None:
            return self.target_layer
        return min(model.n_layers - 1, max(1, math.ceil(0.2 * model.n_layers)))


class SwiGLUProjector(nn.Module):
    """d -> 4d -> d SwiGLU, the paper's projector."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build_projector(kind: ProjectorKind, dim: int) -> nn.Module:
    if kind == "swiglu":
        return SwiGLUProjector(dim, 4 * dim)
    if kind == "linear":
        return nn.Linear(dim, dim, bias=False)
    return nn.Identity()


def nitp_distance(
    prediction: torch.Tensor, target: torch.Tensor, kind: DistanceKind, cosine: torch.Tensor
) -> torch.Tensor:
    """Per-position distance, reduced over the last (hidden) dimension. ``cosine`` is
    the per-position cosine similarity, computed once for the loss and the metric."""
    if kind == "cosine":
        return 1.0 - cosine
    if kind == "smooth_l1":
        return F.smooth_l1_loss(prediction, target, reduction="none").mean(-1)
    return F.mse_loss(prediction, target, reduction="none").mean(-1)


class NextImplicitTokenPrediction(Objective):
    """Next Implicit Token Prediction: pull P(h_t) towards the stop-gradient output of a
    shallow block at t+1 (arXiv 2605.24956)."""

    Options = NITPOptions
    options: NITPOptions
    sequence_parallel = True

    def __init__(self, options: NITPOptions, model: ModelInfo):
        super().__init__(options, model)
        self.target_layer = options.resolved_target_layer(model)
        self.projector = build_projector(options.projector, model.dim)
        self.recompute_projector = options.recompute_projector

    def requirements(self) -> Requirements:
        target = frozenset({self.target_layer})
        return Requirements(final_hidden=True, layers=target, lookahead=1, geometry_layers=target)

    def init_weights(self) -> None:
        # Same scheme as torchtitan's feed-forward blocks: small truncated normals.
        for linear in self.projector.modules():
            if isinstance(linear, nn.Linear):
                nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)

    def checkpoint_activations(self) -> None:
        # The SwiGLU projector keeps three [tokens, 4d] activations for backward, as much
        # as a feed-forward block; recomputing them costs one more projector forward.
        self.recompute_projector = True

    def tensor_parallel_plan(self) -> dict[str, ParallelStyle]:
        if self.options.projector == "swiglu":
            # Megatron's MLP split, as torchtitan splits the trunk's feed-forward blocks.
            return {
                "projector": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "projector.w1": ColwiseParallel(),
                "projector.w3": ColwiseParallel(),
                "projector.w2": RowwiseParallel(output_layouts=Shard(1)),
            }
        if self.options.projector == "linear":
            return {"projector": SequenceParallel(use_local_output=True)}
        return {}

    def forward(self, features: Features) -> ObjectiveOutput:
        sequence = features.sequence
        # Stop-gradient: the target only teaches the trunk's top, never the shallow block.
        # Position t is compared with the target at t + 1; the last position has none.
        # In fp32, like the distance: one copy of the target layer, cast on the way.
        target = sequence.shift_left(
            features.layers[self.target_layer].detach(), 1, 0.0, dtype=torch.float32
        )
        # labels[:, t] is token t+1, the token whose representation is the target; the
        # last position, and a document's last under block-causal masks, have none.
        valid = (features.labels != IGNORE_INDEX) & features.within_document(1)
        count = valid.sum()
        valid = sequence.local(valid)

        hidden = features.final_hidden
        if self.recompute_projector:
            prediction = checkpoint(self.projector, hidden, use_reentrant=False).float()
        else:
            prediction = self.projector(hidden).float()
        cosine = F.cosine_similarity(prediction, target, dim=-1)
        distance = nitp_distance(prediction, target, self.options.loss, cosine)
        loss_sum = sequence.sum(torch.where(valid, distance, 0.0).sum())
        cosine_sum = sequence.sum(torch.where(valid, cosine.detach(), 0.0).sum())
        return ObjectiveOutput(loss_sum, {"cosine": MeanMetric(cosine_sum, count)})
