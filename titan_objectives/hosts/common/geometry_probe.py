"""Geometry of the hidden states during training and validation.

On a measuring step, from the hidden states the forward pass produced anyway (no extra
forward): the covariance moments of every valid token (each rank and sequence shard sums
its own, ``dim x dim`` in fp64, one all-reduce) give the paper's ``effective_rank``; a
bounded random sample of tokens, gathered over the data-parallel ranks, gives
``effective_rank_sv`` and the cosines. Other steps cost nothing.
"""

import logging
import math
from functools import partial
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from titan_objectives.collectives import all_reduce
from titan_objectives.metrics import (
    CovarianceMoments,
    GeometryError,
    effective_rank,
    effective_rank_sv,
    mean_pairwise_cosine,
    random_pair_cosine,
)
from titan_objectives.objective import IGNORE_INDEX, Requirements
from titan_objectives.sequence import SequenceShards

logger = logging.getLogger(__name__)


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
        self._moments: torch.Tensor | None = None  # [layer, 1 + dim + dim^2], fp64

    def take_sample(
        self, hidden: dict[int | str, torch.Tensor], seed: int, valid: torch.Tensor
    ) -> None:
        """Sum the covariance moments of the tokens ``valid`` marks (``[batch, seq]``,
        the whole sequence: those with a label) and keep up to ``tokens_per_rank`` tokens
        of each tracked hidden state. Under sequence parallelism the moments add up over
        the shards; the tracked states are gathered whole for the sample, so that every
        rank of the group samples the same tokens as one unsharded rank would."""
        local_valid = self.sequence.local(valid)
        moments = torch.stack(
            [CovarianceMoments.of(hidden[key], local_valid).as_vector() for key in self.keys]
        )
        if self.sequence.size > 1:  # the tensor-parallel shards of the group's positions
            moments = all_reduce(moments, "sum", self.sequence.mesh)
        self._moments = moments
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
        moments = self._moments
        if self.mesh is not None:
            ids = funcol.all_gather_tensor(ids, 0, self.mesh)
            samples = {k: funcol.all_gather_tensor(v, 0, self.mesh) for k, v in samples.items()}
            moments = all_reduce(moments, "sum", self.mesh)
        generator = torch.Generator().manual_seed(seed)
        values = {}
        for (key, sample), vector in zip(samples.items(), moments, strict=True):
            name = layer_name(key)
            covariance = CovarianceMoments.from_vector(vector, sample.shape[-1])
            metrics = {
                "effective_rank": partial(effective_rank, covariance),
                "effective_rank_sv": partial(effective_rank_sv, sample),
                "avg_cosine": partial(random_pair_cosine, sample, ids, self.pairs, generator),
                "mean_cosine": partial(mean_pairwise_cosine, sample),
            }
            for metric, compute in metrics.items():
                try:
                    values[f"{name}/{metric}"] = compute()
                except GeometryError as error:  # e.g. a batch with almost nothing labelled
                    logger.warning(f"geometry/{name}/{metric} not measured: {error}")
        self._samples, self._moments = {}, None
        if not values:
            return {}
        numbers = torch.stack(list(values.values())).tolist()
        return dict(zip(values, numbers, strict=True))


class GeometryHook:
    """The run's geometry measurements (``[objectives.geometry]``): a sample of a training
    step's forward every ``freq`` steps, logged after the step, and one of each validation
    pass, logged with it. Without a probe (geometry off) every call does nothing."""

    def __init__(self, probe: GeometryProbe | None, freq: int):
        self.probe, self.freq = probe, freq
        self._due = False
        self._sampled = False

    @classmethod
    def build(
        cls,
        options: Any,
        declared_layers: frozenset[int],
        width: int,
        parallel_dims: Any,
        mesh: DeviceMesh | None,
        sequence: SequenceShards,
        validation: bool,
    ) -> "GeometryHook":
        """``options`` is ``[objectives.geometry]``, ``parallel_dims`` the host's (both
        releases name the data-parallel mesh ``batch``)."""
        if not options.freq and not validation:
            return cls(None, 0)
        if parallel_dims.dp_enabled:
            batch_mesh = parallel_dims.get_mesh("batch")
            dp_size, dp_rank = batch_mesh.size(), batch_mesh.get_local_rank()
        else:
            dp_size, dp_rank = 1, 0
        probe = GeometryProbe(
            layers=options.resolved_layers(declared_layers),
            max_tokens=max(options.max_tokens, width),
            pairs=options.pairs,
            mesh=mesh,
            dp_rank=dp_rank,
            dp_size=dp_size,
            sequence=sequence,
        )
        return cls(probe, options.freq)

    def requirements(self) -> Requirements:
        """The hidden states the measurements read."""
        if self.probe is None:
            return Requirements()
        return Requirements(final_hidden=True, layers=frozenset(self.probe.keys[1:]))

    def start_step(self, step: int) -> None:
        self._step = step
        self._due = self.probe is not None and bool(self.freq) and step % self.freq == 0
        self._sampled = False

    @property
    def wants_sample(self) -> bool:
        """A measured step whose first micro-batch has not been sampled yet."""
        return self._due and not self._sampled

    def sample_training(self, captured: Any, labels: torch.Tensor) -> None:
        """The first micro-batch of a measured step."""
        if self.wants_sample:
            self.probe.take_sample(captured.hidden, seed=self._step, valid=labels != IGNORE_INDEX)
            self._sampled = True

    def log_training(self, step: int, metrics_logger: Any) -> None:
        """``geometry/<layer>/<metric>`` to TensorBoard (the host's metrics logger), the
        final hidden states' values to the console."""
        if not self._due:
            return
        values = {f"geometry/{k}": v for k, v in self.probe.measure(seed=step).items()}
        metrics_logger.log(values, step)
        final = "  ".join(
            f"{k.split('/')[2]}: {v:.4g}" for k, v in values.items() if "/final/" in k
        )
        logger.info(f"step: {step:2}  geometry of the final hidden states  {final}")

    def start_validation(self) -> None:
        self._validation_sampled = False

    def sample_validation(self, captured: Any, labels: torch.Tensor, step: int) -> None:
        """The first batch of a validation pass."""
        if self.probe is not None and not self._validation_sampled:
            self.probe.take_sample(captured.hidden, seed=step, valid=labels != IGNORE_INDEX)
            self._validation_sampled = True

    def validation_values(self, step: int) -> dict[str, float]:
        if self.probe is None:
            return {}
        measured = self.probe.measure(seed=step)
        return {f"validation/geometry/{k}": v for k, v in measured.items()}
