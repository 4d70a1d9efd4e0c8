"""How to reach the pieces of a torchtitan model that objectives read.

Objectives never import a model class: they get a ``ModelInfo`` and the hidden states the
adapter captures. One adapter per model family; all of torchtitan's decoder LMs share the
layout ``tok_embeddings -> layers["0".."n-1"] -> norm -> output``.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from titan_objectives.objective import ModelInfo, Requirements


class DecoderAdapter:
    """torchtitan's decoder-only language models."""

    def model_info(self, model_args: Any) -> ModelInfo:
        return ModelInfo(
            dim=model_args.dim, n_layers=model_args.n_layers, vocab_size=model_args.vocab_size
        )

    def layer_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output is hidden state ``layer`` (0 = embeddings, k = block k)."""
        if layer == 0:
            return model.tok_embeddings
        return model.layers[str(layer - 1)]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.norm


_adapters: dict[str, DecoderAdapter] = {"llama3": DecoderAdapter()}


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
        if needs.final_hidden:
            adapter.final_norm(model).register_forward_hook(self._keep("final"))
        for layer in sorted(needs.layers):
            adapter.layer_module(model, layer).register_forward_hook(self._keep(layer))

    def _keep(self, key: int | str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._captured is not None:
                self._captured[key] = output

        return hook

    @contextmanager
    def capture(self) -> Iterator[dict[int | str, torch.Tensor]]:
        """Within the block, forward passes record into the yielded dict ("final", k)."""
        self._captured = captured = {}
        try:
            yield captured
        finally:
            self._captured = None
