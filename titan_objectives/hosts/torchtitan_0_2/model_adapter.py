"""How to reach the pieces of a torchtitan model that objectives read.

Objectives never import a model class: they get a ``ModelInfo`` and the hidden states the
adapter captures. One adapter per model family; all of torchtitan's decoder LMs share the
layout ``tok_embeddings -> layers["0".."n-1"] -> norm -> output``.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from titan_objectives.hosts.common.capture import DocumentsOf, documents_ending_at, live_model
from titan_objectives.hosts.common.parallelize import vocabulary_sharded_logits
from titan_objectives.objective import ModelInfo


class DecoderSharedModules:
    """``SharedModules`` of a torchtitan decoder: looked up on the live model at each
    call, so they see the parameters as parallelization left them. Without a model (the
    config checks build objectives on the meta device before any model exists) only
    ``new_block`` works."""

    def __init__(
        self,
        model: nn.Module | None,
        model_args: Any,
        block_class: Callable[[], type[nn.Module]],
        rope_buffer: str,
    ):
        self._model = model
        self._model_args = model_args
        self._block_class = block_class  # imported on first use: only MTP-like objectives need it
        self._rope_buffer = rope_buffer
        self._loss_parallel: bool | None = None  # None: no tensor parallelism

    def use_tensor_parallel(self, loss_parallel: bool) -> None:
        """The head is vocabulary-sharded and hidden states are sequence shards."""
        self._loss_parallel = loss_parallel

    def _live_model(self) -> nn.Module:
        return live_model(self._model)

    def _rope(self) -> torch.Tensor:
        return getattr(self._live_model(), self._rope_buffer)

    def output_weight(self) -> torch.Tensor:
        return self._live_model().output.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.output_weight()
        if self._loss_parallel is None:
            return F.linear(hidden, weight)
        return vocabulary_sharded_logits(hidden, weight, self._loss_parallel)

    def new_block(self, index: int) -> nn.Module:
        return self._block_class()(index, self._model_args)

    def init_block(self, block: nn.Module) -> None:
        if "buffer_device" in inspect.signature(block.init_weights).parameters:
            block.init_weights(buffer_device=self._rope().device)
        else:
            block.init_weights()

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: dict) -> torch.Tensor:
        return _run_block(block, hidden, self._rope(), context.get("attention_masks"))


@torch.compiler.disable
def _run_block(
    block: nn.Module, hidden: torch.Tensor, rope: torch.Tensor, masks: Any
) -> torch.Tensor:
    """A block outside any compiled objective graph: torchtitan already gave it the trunk
    blocks' compile, activation checkpointing and FSDP hooks, which a second, enclosing
    compile would trace through (and fails to, with AC and TP)."""
    return block(hidden, rope, masks)


@dataclass(frozen=True)
class DecoderAdapter:
    """torchtitan's decoder-only language models; ``block_module`` names the module
    whose ``TransformerBlock`` the objectives' extra blocks are built from, and
    ``rope_buffer`` the model buffer its blocks take rotary embeddings from."""

    block_module: str
    rope_buffer: str = "freqs_cis"

    def block_class(self) -> type[nn.Module]:
        import importlib

        return importlib.import_module(self.block_module).TransformerBlock

    def shared_modules(
        self, model_args: Any, model: nn.Module | None = None
    ) -> DecoderSharedModules:
        """The model's modules for objectives to share; ``model=None`` before it exists."""
        return DecoderSharedModules(model, model_args, self.block_class, self.rope_buffer)

    def model_info(
        self, model_args: Any, seq_len: int, shared: DecoderSharedModules | None = None
    ) -> ModelInfo:
        return ModelInfo(
            dim=model_args.dim,
            n_layers=model_args.n_layers,
            vocab_size=model_args.vocab_size,
            seq_len=seq_len,
            norm_eps=getattr(model_args, "norm_eps", 1e-5),
            shared=shared,
        )

    def layer_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output is hidden state ``layer`` (0 = embeddings, k = block k)."""
        if layer == 0:
            return model.tok_embeddings
        return model.layers[str(layer - 1)]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.norm

    def output_head(self, model: nn.Module) -> nn.Module:
        return model.output


_adapters: dict[str, DecoderAdapter] = {
    "llama3": DecoderAdapter("torchtitan.models.llama3.model.model"),
    "deepseek_v3": DecoderAdapter("torchtitan.models.deepseek_v3.model.model"),
    "qwen3": DecoderAdapter("torchtitan.models.qwen3.model.model", rope_buffer="rope_cache"),
    "llama4": DecoderAdapter("torchtitan.models.llama4.model.model"),
}


def get_model_adapter(model_name: str) -> DecoderAdapter:
    if model_name not in _adapters:
        raise ValueError(
            f"model.name = {model_name!r} has no titan-objectives adapter; "
            f"supported models: {', '.join(sorted(_adapters))}"
        )
    return _adapters[model_name]


def packs_documents(model_args: Any) -> bool:
    """Whether the model attends within documents only (block-causal masks)."""
    return (
        getattr(model_args, "attn_type", "sdpa") != "sdpa"
        and getattr(model_args, "attn_mask_type", "causal") == "block_causal"
    )


def documents_of(model_args: Any, eos_id: int | None) -> DocumentsOf:
    """How a forward's documents are found: under block-causal masks an EOS token ends
    its document (torchtitan 0.2.2 has no position ids); otherwise there is one stream."""
    if not packs_documents(model_args):
        return lambda args, kwargs: None
    if eos_id is None:
        raise ValueError("block-causal attention needs a tokenizer with an EOS token")
    return lambda args, kwargs: documents_ending_at(args[0], eos_id)
