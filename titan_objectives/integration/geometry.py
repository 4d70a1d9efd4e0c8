"""Geometry of the hidden states during training and validation.

On a measuring step a bounded sample of tokens is taken from the hidden states the
forward pass produced anyway (no extra forward, no copy of whole tensors), gathered over
the data-parallel ranks, and measured; other steps cost nothing.
"""

import math

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from titan_objectives.metrics import effective_rank, mean_pairwise_cosine, random_pair_cosine
from titan_objectives.sequence import SequenceShards


def layer_name(key: int | str) -> str:
    return "final" if key == "final" else f"layer_{key}"


class GeometryProbe:
    def __init__(
        self,
        layers: list[int],
        max_tokens: int,
        pairs: int,
        mesh: DeviceMesh | None,
        dp_rank: int,
        dp_size: int,
        sequence: SequenceShards,
    ):
        self.keys: list[int | str] = ["final", *layers]
        self.tokens_per_rank = math.ceil(max_tokens / dp_size)
        self.pairs = pairs
        self.mesh = mesh
        self.dp_rank = dp_rank
        self.sequence = sequence
        self._samples: dict[int | str, torch.Tensor] = {}
        self._sequence_ids: torch.Tensor | None = None

    def take_sample(self, hidden: dict[int | str, torch.Tensor], seed: int) -> None:
        """Keep up to ``tokens_per_rank`` tokens of each tracked hidden state. Under
        sequence parallelism the tracked states are gathered whole first, so that every
        rank of the group samples the same tokens as one unsharded rank would."""
        hidden = {key: self.sequence.gather(hidden[key]) for key in self.keys}
        batch, seq, _ = hidden["final"].shape
        generator = torch.Generator().manual_seed(seed * 1009 + self.dp_rank)
        count = min(self.tokens_per_rank, batch * seq)
        index = torch.randperm(batch * seq, generator=generator)[:count]
        device = hidden["final"].device
        self._samples = {
            key: hidden[key].detach().reshape(batch * seq, -1)[index.to(device)].float()
            for key in self.keys
        }
        rows = (index // seq) + self.dp_rank * batch
        self._sequence_ids = rows.to(device)

    def measure(self, seed: int) -> dict[str, float]:
        """Metrics of the last sample, over all ranks: ``<layer>/effective_rank`` etc."""
        if not self._samples:
            return {}
        ids = self._sequence_ids
        samples = self._samples
        if self.mesh is not None:
            ids = funcol.all_gather_tensor(ids, 0, self.mesh)
            samples = {k: funcol.all_gather_tensor(v, 0, self.mesh) for k, v in samples.items()}
        generator = torch.Generator().manual_seed(seed)
        values = {}
        for key, sample in samples.items():
            name = layer_name(key)
            values[f"{name}/effective_rank"] = effective_rank(sample)
            values[f"{name}/avg_cosine"] = random_pair_cosine(sample, ids, self.pairs, generator)
            values[f"{name}/mean_cosine"] = mean_pairwise_cosine(sample)
        self._samples = {}
        numbers = torch.stack(list(values.values())).tolist()
        return dict(zip(values, numbers, strict=True))
