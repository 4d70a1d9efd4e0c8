"""How to reach the pieces of a torchtitan model that objectives read.

Objectives never import a model class: they get a ``ModelInfo`` and the hidden states the
adapter captures. One adapter per model family; all of torchtitan's decoder LMs share the
layout ``tok_embeddings -> layers["0".."n-1"] -> norm -> output``.
"""

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from titan_objectives.objective import ModelInfo, Requirements


class DecoderSharedModules:
    """``SharedModules`` of a torchtitan decoder: looked up on the live model at each
    call, so they see the parameters as parallelization left them."""

    def __init__(
        self, model: nn.Module, model_args: Any, block_cls: type[nn.Module], rope_buffer: str
    ):
        self._model = model
        self._model_args = model_args
        self._block_cls = block_cls
        self._rope_buffer = rope_buffer
        self._loss_parallel: bool | None = None  # None: no tensor parallelism

    def use_tensor_parallel(self, loss_parallel: bool) -> None:
        """The head is vocabulary-sharded and hidden states are sequence shards."""
        self._loss_parallel = loss_parallel

    def _rope(self) -> torch.Tensor:
        return getattr(self._model, self._rope_buffer)

    def output_weight(self) -> torch.Tensor:
        return self._model.output.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.output_weight()
        if self._loss_parallel is None:
            return F.linear(hidden, weight)
        # What the model's own head does under TP (torchtitan's ColwiseParallel plan for
        # ``output``): gather the sequence, multiply by this rank's vocabulary rows.
        mesh = weight.device_mesh
        hidden = DTensor.from_local(hidden, mesh, [Shard(1)]).redistribute(mesh, [Replicate()])
        logits = F.linear(hidden, weight)
        if self._loss_parallel:
            return logits
        return logits.redistribute(mesh, [Replicate()]).to_local()

    def new_block(self, index: int) -> nn.Module:
        return self._block_cls(index, self._model_args)

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

    def model_info(
        self, model_args: Any, seq_len: int, model: nn.Module | None = None
    ) -> ModelInfo:
        shared = (
            DecoderSharedModules(model, model_args, self.block_class(), self.rope_buffer)
            if model is not None
            else None
        )
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


def register_model_adapter(model_name: str, adapter: DecoderAdapter) -> None:
    if model_name in _adapters:
        raise ValueError(f"a model adapter for {model_name!r} is already registered")
    _adapters[model_name] = adapter


def get_model_adapter(model_name: str) -> DecoderAdapter:
    if model_name not in _adapters:
        raise ValueError(
            f"model.name = {model_name!r} has no titan-objectives adapter; "
            f"supported models: {', '.join(sorted(_adapters))}"
        )
    return _adapters[model_name]


class HiddenStateTap:
    """Forward hooks that keep the hidden states the objectives need, while armed.

    Hooks sit on the (possibly compiled, checkpointed, FSDP-wrapped) modules themselves,
    so the model's own forward runs unchanged and nothing is recomputed or copied.
    Register after parallelization: compile and AC replace the block modules.
    """

    def __init__(self, model: nn.Module, adapter: DecoderAdapter, needs: Requirements):
        self._captured: dict[int | str, torch.Tensor] | None = None
        self._keep_logits = False
        if needs.final_hidden:
            adapter.final_norm(model).register_forward_hook(self._keep("final"))
        for layer in sorted(needs.layers):
            adapter.layer_module(model, layer).register_forward_hook(self._keep(layer))
        if not needs.logits:
            # Nobody reads the logits: let the head run on zero positions.
            adapter.output_head(model).register_forward_pre_hook(self._skip_positions)

    def _skip_positions(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._captured is None or self._keep_logits:
            return None  # validation and other callers get the full logits
        hidden, *rest = args
        return (hidden[:, :0], *rest)

    def _keep(self, key: int | str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._captured is not None:
                # Under sequence parallelism the final norm returns a DTensor; objectives
                # get every hidden state as this rank's plain sequence shard.
                self._captured[key] = output.to_local() if isinstance(output, DTensor) else output

        return hook

    @contextmanager
    def capture(self, keep_logits: bool = False) -> Iterator[dict[int | str, torch.Tensor]]:
        """Within the block, forward passes record into the yielded dict ("final", k).
        Unless ``keep_logits``, the model skips logits no objective reads."""
        self._captured = captured = {}
        self._keep_logits = keep_logits
        try:
            yield captured
        finally:
            self._captured = None
