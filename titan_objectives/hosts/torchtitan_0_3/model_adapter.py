"""How the objectives reach the pieces of a torchtitan 0.3 model.

Every language model of torchtitan 0.3 is a ``models.common.decoder.Decoder``
(``tok_embeddings -> layers["0".."n-1"] -> norm -> lm_head``) whose blocks take
``(hidden, attention_masks, positions)`` and build their own rotary embeddings, so one
adapter serves llama3, qwen3 and deepseek_v3 alike.
"""

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torchtitan.models.common.decoder import Decoder
from torchtitan.protocols.module import Module as TitanModule

from titan_objectives.hosts.common.capture import (
    DecoderLayout,
    documents_starting_at,
    live_model,
    sequence_shard,
)
from titan_objectives.hosts.common.moe_balance import BufferNames
from titan_objectives.hosts.common.parallelize import vocabulary_sharded_logits
from titan_objectives.objective import ModelInfo
from titan_objectives.stack import ObjectiveStack


class HostedObjectiveStack(ObjectiveStack, TitanModule):
    """The stack as a torchtitan 0.3 module, so that ``model.init_weights`` initializes
    it: torchtitan's ``init_states`` reaches the blocks of the model's kind it holds
    first, then ``_init_self_parameters`` runs the objectives' own ``init_weights``
    (which initializes those blocks again, the way the objective wants)."""

    def _init_self_parameters(self) -> None:
        self.init_weights()


# Where torchtitan 0.3's MoE routers keep their expert bias and token counts.
ROUTER_BUFFERS = BufferNames("expert_bias_E", "tokens_per_expert_E")

# Where the hidden-state hooks attach (the head is ``lm_head`` in this release).
LAYOUT = DecoderLayout(head="lm_head")


class DecoderSharedModules:
    """``SharedModules`` of a torchtitan 0.3 ``Decoder``, made with the stack before the
    model exists (then only ``new_block`` works) and bound to it once it does: looked up
    on the live model at each call, so they see the parameters as parallelization left
    them."""

    def __init__(self, model_config: Decoder.Config):
        self._model: nn.Module | None = None
        self._model_config = model_config
        self._tp_mesh: DeviceMesh | None = None

    def bind(self, model: nn.Module) -> None:
        self._model = model

    def block_class(self) -> type[nn.Module]:
        return type(self._model_config.layers[-1])._owner

    def use_tensor_parallel(self, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
        """The head is vocabulary-sharded and hidden states are sequence shards; torchtitan
        0.3 computes the loss on vocabulary-sharded logits (``loss_parallel`` is True)."""
        self._tp_mesh = tp_mesh

    def _live_model(self) -> nn.Module:
        return live_model(self._model)

    def output_weight(self) -> torch.Tensor:
        return self._live_model().lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._tp_mesh is None:
            return F.linear(hidden, self.output_weight())
        return vocabulary_sharded_logits(hidden, self.output_weight(), keep_sharded=True)

    def new_block(self, index: int) -> nn.Module:
        """A block built from the config of the model's last block (as torchtitan 0.3's
        own MTP builds its blocks), with its rotary embedding for ``training.seq_len``."""
        return copy.deepcopy(self._model_config.layers[-1]).build()

    def init_block(self, block: nn.Module) -> None:
        block.init_states(buffer_device=None)

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: dict) -> torch.Tensor:
        masks, positions = context.get("attention_masks"), context.get("positions")
        return _run_block(block, hidden, masks, positions, self._tp_mesh)


@torch.compiler.disable
def _run_block(
    block: nn.Module,
    hidden: torch.Tensor,
    masks: Any,
    positions: torch.Tensor | None,
    tp_mesh: DeviceMesh | None,
) -> torch.Tensor:
    """A block outside any compiled objective graph: torchtitan gives it the trunk blocks'
    compile, activation checkpointing and FSDP unit itself. Under TP it takes and returns
    sequence shards as DTensors, as the trunk's blocks do."""
    if tp_mesh is not None:
        hidden = DTensor.from_local(hidden, tp_mesh, [Shard(1)])
    return sequence_shard(block(hidden, masks, positions))


def model_info(
    model_config: Decoder.Config, seq_len: int, shared: DecoderSharedModules | None
) -> ModelInfo:
    return ModelInfo(
        dim=model_config.dim,
        n_layers=len(model_config.layers),
        vocab_size=model_config.vocab_size,
        seq_len=seq_len,
        norm_eps=model_config.norm.eps,
        shared=shared,
    )


def documents_by_position(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """torchtitan 0.3 packs documents with position ids that restart at 0 with each
    document (and masks attention by them): the documents follow from ``positions``."""
    positions = kwargs.get("positions")
    return None if positions is None else documents_starting_at(positions)
