"""What one forward pass of a model produced for the objectives, captured with hooks.

Plain PyTorch, shared by every host: a host says where a model keeps its blocks, final
norm and output head (``ModelLayout``), and how to tell documents apart in a packed
batch; the hooks do the rest.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from titan_objectives.objective import Features, Requirements
from titan_objectives.sequence import SequenceShards

DocumentsOf = Callable[[tuple, dict], "torch.Tensor | None"]
"""The document index of each position of a batch, from the model's forward arguments
(positional, keyword). A host gives None instead when the model attends across
documents, so that nothing is computed (or, under context parallelism, gathered)."""


class ModelLayout(Protocol):
    def layer_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output is hidden state ``layer`` (0 = embeddings, k = block k)."""
        ...

    def final_norm(self, model: nn.Module) -> nn.Module: ...

    def output_head(self, model: nn.Module) -> nn.Module: ...

    def holds_layer(self, model: nn.Module, layer: int) -> bool:
        """Whether this model (a pipeline stage holds some of the modules) has the module
        of hidden state ``layer``."""
        ...

    def holds_output_head(self, model: nn.Module) -> bool: ...


@dataclass(frozen=True)
class DecoderLayout:
    """A torchtitan decoder LM's ``ModelLayout``: ``tok_embeddings -> layers["0".."n-1"]
    -> norm -> <head>``, where the head's name differs between releases."""

    head: str

    def layer_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.tok_embeddings if layer == 0 else model.layers[str(layer - 1)]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.norm

    def output_head(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.head)

    def holds_layer(self, model: nn.Module, layer: int) -> bool:
        if layer == 0:
            return model.tok_embeddings is not None
        return str(layer - 1) in model.layers

    def holds_output_head(self, model: nn.Module) -> bool:
        return getattr(model, self.head) is not None


def documents_ending_at(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The document index of each position of packed ``[batch, seq]`` tokens when an
    EOS token ends its document (torchtitan 0.2.2's block-causal masks)."""
    eos = (tokens == eos_id).int()
    return eos.cumsum(dim=1) - eos


def documents_starting_at(positions: torch.Tensor) -> torch.Tensor:
    """The document index of each position of a packed ``[batch, seq]`` batch whose
    position ids restart at 0 with each document (torchtitan 0.3's ``positions``).
    A sequence that starts inside a document counts it as document 0 all the same."""
    starts = (positions == 0).int()
    starts[:, 0] = 1
    return starts.cumsum(dim=1) - 1


def live_model(model: nn.Module | None) -> nn.Module:
    """The model a host's ``SharedModules`` reads from, which exists only once the trainer
    built it (the config checks build objectives before: they may not use it)."""
    if model is None:
        raise RuntimeError(
            "SharedModules: the model does not exist yet (objectives are being built for "
            "the config checks); use the model's modules only in forward"
        )
    return model


def sequence_shard(hidden: torch.Tensor) -> torch.Tensor:
    """This rank's plain sequence shard of a hidden state. Under tensor parallelism the
    model's modules return DTensors: sequence shards (``Shard(1)``), or whole sequences
    replicated on every rank (torchtitan 0.3's final norm), which are cut to this rank's
    shard, so that objectives see every hidden state the same way.

    A shard still wrapped as an ``AsyncCollectiveTensor`` (the output of a collective not
    waited for yet, e.g. the vocabulary-parallel embedding's reduce-scatter) is copied
    into a plain tensor: a compiled objective drops the gradient of such an input
    (pytorch/pytorch#179849)."""
    if isinstance(hidden, DTensor):
        if all(isinstance(p, Replicate) for p in hidden.placements):
            mesh = hidden.device_mesh
            hidden = hidden.redistribute(mesh, [Shard(1)] * mesh.ndim)
        hidden = hidden.to_local()
    if isinstance(hidden, AsyncCollectiveTensor):
        return hidden.clone()
    return hidden


@dataclass
class ForwardCapture:
    """What one forward pass of the model produced for the objectives: hidden states
    ("final", or k as in ``Requirements.layers``), the keyword arguments the model ran
    with (attention masks, which blocks of the objectives must run with too), and the
    document index of each position under block-causal masks."""

    hidden: dict[int | str, torch.Tensor] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    documents: torch.Tensor | None = None

    def features(
        self, labels: torch.Tensor, logits: torch.Tensor | None, sequence: SequenceShards
    ) -> Features:
        """The objectives' view of this forward pass; training and validation alike."""
        return Features(
            labels=labels,
            logits=logits,
            final_hidden=self.hidden.get("final"),
            layers={key: value for key, value in self.hidden.items() if key != "final"},
            context=self.context,
            documents=self.documents,
            sequence=sequence,
        )


class HiddenStateTap:
    """Hooks that keep what the objectives need from the model's forward, while armed.

    Hooks sit on the (possibly compiled, checkpointed, FSDP-wrapped) modules themselves,
    so the model's own forward runs unchanged and nothing is recomputed or copied; the
    model's own pre-hook records its keyword arguments, so training and validation give
    the objectives the same context from one place. Register after parallelization:
    compile and AC replace the block modules. On a pipeline stage only the modules the
    stage holds are hooked (the final norm and head are on the last stage).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        needs: Requirements,
        documents_of: DocumentsOf | None,
    ):
        self._capture: ForwardCapture | None = None
        self._keep_logits = False
        self._documents_of = documents_of
        model.register_forward_pre_hook(self._keep_context, with_kwargs=True)
        holds_head = layout.holds_output_head(model)
        if needs.final_hidden and holds_head:
            layout.final_norm(model).register_forward_hook(self._keep("final"))
        for layer in sorted(k for k in needs.layers if layout.holds_layer(model, k)):
            layout.layer_module(model, layer).register_forward_hook(self._keep(layer))
        if not needs.logits and holds_head:
            # Nobody reads the logits: let the head run on zero positions.
            layout.output_head(model).register_forward_pre_hook(self._skip_positions)

    def _keep_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capture is None:
            return
        self._capture.context = dict(kwargs)
        if self._documents_of is not None:
            self._capture.documents = self._documents_of(args, kwargs)

    def _skip_positions(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._capture is None or self._keep_logits:
            return None  # validation and other callers get the full logits
        hidden, *rest = args
        if isinstance(hidden, DTensor):
            # Sequence shards (TP) cannot be cut to zero positions: DTensor's view rules
            # divide by their length. One position per rank costs as little.
            local = hidden.to_local()[:, :1]
            return (DTensor.from_local(local, hidden.device_mesh, hidden.placements), *rest)
        return (hidden[:, :0], *rest)

    def _keep(self, key: int | str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._capture is not None:
                self._capture.hidden[key] = sequence_shard(output)

        return hook

    @property
    def current(self) -> ForwardCapture | None:
        """The capture forward passes record into now (None: not armed)."""
        return self._capture

    def new_forward(self) -> ForwardCapture | None:
        """If armed, a new capture for the next forward (a pipeline stage's micro-batch)."""
        if self._capture is not None:
            self._capture = ForwardCapture()
        return self._capture

    @contextmanager
    def capture(self, keep_logits: bool = False) -> Iterator[ForwardCapture]:
        """Within the block, forward passes record into the yielded capture (the last
        one's). Unless ``keep_logits``, the model skips logits no objective reads."""
        self._capture = captured = ForwardCapture()
        self._keep_logits = keep_logits
        try:
            yield captured
        finally:
            self._capture = None
