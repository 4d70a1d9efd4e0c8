"""``mtp``: multi-token prediction, two ways of predicting tokens beyond the next one.

``deepseek`` (DeepSeek-V3): D sequential modules. Module k joins ``RMSNorm(h^{k-1}_i)`` and
``RMSNorm(Emb(t_{i+k}))`` with a 2d -> d projection, runs one transformer block of the
model's own kind, and predicts t_{i+k+1} through its own norm and the model's shared
output head. ``h^0`` is the trunk's last block output; the embeddings are the model's own
embedding outputs, shifted, so the embedding is shared without a second lookup.

``parallel`` (Gloeckle et al. 2024): D independent heads on the trunk's last block
output, each one block of the model's kind, its own norm, and the shared output head;
head k predicts t_{i+k+1}.

In both, depth k predicts k tokens beyond the next one. The objective returns
``(1/D) sum_k CE_k`` (so ``weight`` is DeepSeek-V3's lambda) and each ``CE_k`` as the
metric ``depth_k``. Positions whose shifted label falls past the end of the sequence, or
is -100, or whose input token t_{i+k} is a padding position or (packed documents under
block-causal masks) in another document, score nothing.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel
from torch.utils.checkpoint import checkpoint

from titan_objectives.losses import (
    CrossEntropyOptions,
    cross_entropy_sum,
    linear_cross_entropy_sum,
)
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
    SharedModules,
)
from titan_objectives.sequence import SequenceShards, shift_left

MTPVariant = Literal["deepseek", "parallel"]


@dataclass
class MTPOptions(CrossEntropyOptions, ObjectiveOptions):
    weight: float = 0.3
    """Lambda of (1/D) sum_k CE_k. DeepSeek-V3: 0.3, then 0.1 (schedule = 'step')."""

    variant: MTPVariant = "deepseek"
    """'deepseek': sequential modules (DeepSeek-V3); 'parallel': independent heads
    (Gloeckle et al. 2024)."""

    depth: int = 1
    """D, the number of extra tokens predicted (DeepSeek-V3 used 1)."""

    recompute_heads: bool = False
    """Recompute each depth's forward in backward instead of keeping its activations, so
    activation memory does not grow with D (costs one extra forward per depth)."""

    def validate(self, model: ModelInfo) -> None:
        super().validate(model)
        if self.depth < 1:
            raise OptionError("depth", self.depth, "an integer >= 1")
        if self.depth >= model.seq_len:
            raise OptionError(
                "depth",
                self.depth,
                f"an integer < training.seq_len = {model.seq_len}: depth k scores positions "
                f"i < seq_len - k, so depth {self.depth} would score none",
            )
        self.validate_cross_entropy()


def depth_labels(labels: torch.Tensor, k: int, within_document: torch.Tensor) -> torch.Tensor:
    """Targets of depth k: ``labels[:, i + k]`` (token i+k+1), ignored past the end, where
    the input token t_{i+k} (``labels[:, i+k-1]``) is itself a padding position, or where
    it lies in another document than position i (``within_document``, from
    ``Features.within_document(k)``)."""
    target = shift_left(labels, k, IGNORE_INDEX)
    input_is_padding = shift_left(labels, k - 1, IGNORE_INDEX) == IGNORE_INDEX
    return target.masked_fill(input_is_padding | ~within_document, IGNORE_INDEX)


class DeepSeekMTPModule(nn.Module):
    def __init__(self, model: ModelInfo, block: nn.Module):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(model.dim, eps=model.norm_eps)
        self.embedding_norm = nn.RMSNorm(model.dim, eps=model.norm_eps)
        self.projection = nn.Linear(2 * model.dim, model.dim, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(model.dim, eps=model.norm_eps)


class ParallelHead(nn.Module):
    def __init__(self, model: ModelInfo, block: nn.Module):
        super().__init__()
        self.block = block
        self.norm = nn.RMSNorm(model.dim, eps=model.norm_eps)


class MultiTokenPrediction(Objective):
    """Multi-token prediction: DeepSeek-V3's sequential modules or parallel heads, each a
    block of the model's own kind, through the model's shared output head."""

    Options = MTPOptions
    options: MTPOptions
    sequence_parallel = True

    def __init__(self, options: MTPOptions, model: ModelInfo):
        super().__init__(options, model)
        if model.shared is None:
            raise ValueError("mtp needs the model's shared modules (ModelInfo.shared)")
        self.shared: SharedModules = model.shared
        module_cls = DeepSeekMTPModule if options.variant == "deepseek" else ParallelHead
        self.depths = nn.ModuleList(
            module_cls(model, model.shared.new_block(model.n_layers + k))
            for k in range(options.depth)
        )

    def requirements(self) -> Requirements:
        layers = {self.model_info.n_layers}
        if self.options.variant == "deepseek":
            layers.add(0)  # the embedding outputs, shifted, are Emb(t_{i+k})
        return Requirements(
            layers=frozenset(layers),
            lookahead=self.options.depth,
            output_weight=True,  # the shared head, outside the model's forward
            whole_vocabulary=bool(self.options.chunk_size) and self.options.ce_backend == "torch",
        )

    def init_weights(self) -> None:
        std = self.model_info.dim**-0.5
        for module in self.depths:
            for norm in (m for m in module.modules() if isinstance(m, nn.RMSNorm)):
                norm.reset_parameters()
            if isinstance(module, DeepSeekMTPModule):
                nn.init.trunc_normal_(module.projection.weight, std=std, a=-3 * std, b=3 * std)
            self.shared.init_block(module.block)

    def tensor_parallel_plan(self) -> dict[str, ParallelStyle]:
        # Norms and the 2d -> d projection act per position: replicate their weights and
        # run them on sequence shards (their gradients are reduced over the group).
        per_position = ("hidden_norm", "embedding_norm", "projection", "norm")
        return {
            f"depths.{k}.{name}": SequenceParallel(use_local_output=True)
            for k, module in enumerate(self.depths)
            for name in per_position
            if hasattr(module, name)
        }

    def flops_per_token(self) -> int:
        """Own matmuls (6 per parameter; all experts counted for MoE blocks, an upper
        bound), plus per depth the shared output head (6 V d) and the block's attention
        scores (12 d seq_len, torchtitan's convention)."""
        info = self.model_info
        per_depth = 6 * info.vocab_size * info.dim + 12 * info.dim * info.seq_len
        return super().flops_per_token() + self.options.depth * per_depth

    def _cross_entropy(
        self, hidden: torch.Tensor, labels: torch.Tensor, sequence: SequenceShards
    ) -> torch.Tensor:
        options = self.options
        if options.chunk_size:
            weight = self.shared.output_weight()
            return linear_cross_entropy_sum(
                hidden, weight, labels, options.chunk_size, options.ce_backend, sequence
            )
        # The head's logits hold the positions of this rank's tensor-parallel group.
        return cross_entropy_sum(self.shared.logits(hidden), sequence.in_group(labels))

    def _depth_loss(
        self,
        k: int,
        module: nn.Module,
        previous: torch.Tensor,
        embeddings: torch.Tensor | None,
        labels: torch.Tensor,
        context: dict,
        sequence: SequenceShards,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CE sum of depth k, and its hidden states (the next deepseek depth's input)."""
        if isinstance(module, DeepSeekMTPModule):
            embedded = sequence.shift_left(embeddings, k, 0.0)
            joined = torch.cat(
                [module.hidden_norm(previous), module.embedding_norm(embedded)], dim=-1
            )
            previous = module.projection(joined)
        hidden = self.shared.run_block(module.block, previous, context)
        return self._cross_entropy(module.norm(hidden), labels, sequence), hidden

    def forward(self, features: Features) -> ObjectiveOutput:
        trunk = features.layers[self.model_info.n_layers]
        embeddings = features.layers.get(0)
        sequential = self.options.variant == "deepseek"
        previous = trunk
        total = trunk.new_zeros((), dtype=torch.float32)
        metrics: dict[str, MeanMetric] = {}
        for k, module in enumerate(self.depths, start=1):
            labels = depth_labels(features.labels, k, features.within_document(k))
            args = (k, module, previous, embeddings, labels, features.context, features.sequence)
            if self.options.recompute_heads:
                ce, hidden = checkpoint(self._depth_loss, *args, use_reentrant=False)
            else:
                ce, hidden = self._depth_loss(*args)
            if sequential:
                previous = hidden
            total = total + ce
            metrics[f"depth_{k}"] = MeanMetric(ce.detach(), (labels != IGNORE_INDEX).sum())
        return ObjectiveOutput(total / self.options.depth, metrics)
