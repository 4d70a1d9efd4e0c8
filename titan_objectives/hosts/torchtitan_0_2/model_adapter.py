"""How to reach the pieces of a torchtitan model that objectives read.

Objectives never import a model class: they get a ``ModelInfo`` and the hidden states the
runtime captures. All of torchtitan 0.2.2's decoder LMs share the layout
``tok_embeddings -> layers["0".."n-1"] -> norm -> output``; a ``ModelFamily`` says where
each keeps its block class and rotary embeddings.
"""

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.common.capture import (
    DecoderLayout,
    DocumentsOf,
    documents_ending_at,
    live_model,
)
from titan_objectives.hosts.common.moe_balance import BufferNames
from titan_objectives.hosts.common.parallelize import vocabulary_sharded_logits
from titan_objectives.objective import ModelInfo

# Where torchtitan 0.2.2's MoE routers keep their expert bias and token counts.
ROUTER_BUFFERS = BufferNames("expert_bias", "tokens_per_expert")

# Where the hidden-state hooks attach (the head is ``output`` in this release).
LAYOUT = DecoderLayout(head="output")


@dataclass(frozen=True)
class ModelFamily:
    """``block_module`` names the module whose ``TransformerBlock`` the objectives' extra
    blocks are built from, ``rope_buffer`` the model buffer its blocks take rotary
    embeddings from."""

    block_module: str
    rope_buffer: str = "freqs_cis"

    def block_class(self) -> type[nn.Module]:
        return importlib.import_module(self.block_module).TransformerBlock


FAMILIES: dict[str, ModelFamily] = {
    "llama3": ModelFamily("torchtitan.models.llama3.model.model"),
    "deepseek_v3": ModelFamily("torchtitan.models.deepseek_v3.model.model"),
    "qwen3": ModelFamily("torchtitan.models.qwen3.model.model", rope_buffer="rope_cache"),
    "llama4": ModelFamily("torchtitan.models.llama4.model.model"),
}


def model_family(model_name: str) -> ModelFamily:
    if model_name not in FAMILIES:
        raise ObjectivesConfigError(
            f"model.name = {model_name!r} has no titan-objectives adapter; "
            f"supported models: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_name]


class DecoderSharedModules:
    """``SharedModules`` of a torchtitan 0.2.2 decoder, made with the stack before the
    model exists (then only ``new_block`` works) and bound to it once it does: looked up
    on the live model at each call, so they see the parameters as parallelization left
    them."""

    def __init__(self, model_args: Any, family: ModelFamily):
        self._model: nn.Module | None = None
        self._model_args = model_args
        self._family = family
        self._tp: tuple[DeviceMesh, bool] | None = None

    def bind(self, model: nn.Module) -> None:
        self._model = model

    def block_class(self) -> type[nn.Module]:
        return self._family.block_class()

    def use_tensor_parallel(self, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
        """The head is vocabulary-sharded and hidden states are sequence shards; with
        ``loss_parallel`` the logits stay vocabulary-sharded."""
        self._tp = (tp_mesh, loss_parallel)

    def _live_model(self) -> nn.Module:
        return live_model(self._model)

    def _rope(self) -> torch.Tensor:
        return getattr(self._live_model(), self._family.rope_buffer)

    def output_weight(self) -> torch.Tensor:
        return self._live_model().output.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.output_weight()
        if self._tp is None:
            return F.linear(hidden, weight)
        return vocabulary_sharded_logits(hidden, weight, keep_sharded=self._tp[1])

    def new_block(self, index: int) -> nn.Module:
        return self._family.block_class()(index, self._model_args)

    def init_block(self, block: nn.Module) -> None:
        if "buffer_device" in inspect.signature(block.init_weights).parameters:
            block.init_weights(buffer_device=self._rope().device)
        else:
            block.init_weights()

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: dict) -> torch.Tensor:
        # Under context parallelism the trunk's blocks take each position's place in the
        # sequence (``positions``) for their rotary embeddings: so do the objectives'.
        rope, masks = self._rope(), context.get("attention_masks")
        return _run_block(block, hidden, rope, masks, context.get("positions"))


@torch.compiler.disable
def _run_block(
    block: nn.Module, hidden: torch.Tensor, rope: torch.Tensor, masks: Any, positions: Any
) -> torch.Tensor:
    """A block outside any compiled objective graph: torchtitan already gave it the trunk
    blocks' compile, activation checkpointing and FSDP hooks, which a second, enclosing
    compile would trace through (and fails to, with AC and TP)."""
    return block(hidden, rope, masks, positions)


def model_info(model_args: Any, seq_len: int, shared: DecoderSharedModules | None) -> ModelInfo:
    return ModelInfo(
        dim=model_args.dim,
        n_layers=model_args.n_layers,
        vocab_size=model_args.vocab_size,
        seq_len=seq_len,
        norm_eps=getattr(model_args, "norm_eps", 1e-5),
        shared=shared,
    )


def packs_documents(model_args: Any) -> bool:
    """Whether the model attends within documents only (block-causal masks)."""
    return (
        getattr(model_args, "attn_type", "sdpa") != "sdpa"
        and getattr(model_args, "attn_mask_type", "causal") == "block_causal"
    )


def documents_by_eos(model_args: Any, eos_id: int | None) -> DocumentsOf | None:
    """How a forward's documents are found: under block-causal masks an EOS token ends
    its document (torchtitan 0.2.2 has no position ids); otherwise there is one stream."""
    if not packs_documents(model_args):
        return None
    if eos_id is None:
        raise ValueError("block-causal attention needs a tokenizer with an EOS token")
    return lambda args, kwargs: documents_ending_at(args[0], eos_id)
