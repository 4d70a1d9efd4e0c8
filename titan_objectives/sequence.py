"""How a batch's positions are split over ranks, and the two operations that cross shards.

Under sequence parallelism (torchtitan's tensor parallel) each rank of the group holds
positions ``[rank * n, (rank + 1) * n)`` of the positions the group holds together, while
labels stay whole. Under context parallelism each group holds some chunks of every
sequence (``ContextLayout``: with load balancing one near the start and one near the
end). Most of an objective is per position and runs unchanged on a shard; only a shift
along the sequence and a sum over positions need the other shards. Objectives do both
through ``Features.sequence``, so one code path is right on one rank and on any split.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_objectives.collectives import all_gather, sum_over_ranks


def shift_left(
    x: torch.Tensor, k: int, fill: float | int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``out[:, i] = x[:, i + k]`` along dim 1; the last k positions are ``fill``. One
    new tensor, in ``dtype`` (default: ``x``'s), so a cast costs no second copy."""
    out = x.new_full(x.shape, fill, dtype=dtype)
    out[:, : x.shape[1] - k] = x[:, k:]
    return out


@dataclass
class ContextLayout:
    """Which positions of a sequence each context-parallel rank holds."""

    mesh: DeviceMesh
    positions_of: Callable[[int], torch.Tensor]
    """Sequence length -> the positions this rank holds, in its order (1-D, int64): how
    the host's torchtitan shards a sequence (its load balancer included)."""
    _routes: dict[tuple[int, int], "_Routes"] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive positions a rank holds: ``start`` in the sequence, ``at`` in
    the rank's own tensor, ``length`` of them."""

    start: int
    at: int
    length: int


def _segments(positions: list[int]) -> list[_Segment]:
    runs: list[_Segment] = []
    for at, position in enumerate(positions):
        if runs and position == runs[-1].start + runs[-1].length:
            last = runs[-1]
            runs[-1] = _Segment(last.start, last.at, last.length + 1)
        else:
            runs.append(_Segment(position, at, 1))
    return runs


@dataclass(frozen=True)
class _Routes:
    """For one sequence length, under context (and tensor) parallelism: this rank's
    positions, its segments, and where each segment's continuation starts (as an index
    into the segment heads every rank contributes, or None at the sequence's end)."""

    positions: torch.Tensor
    group_positions: torch.Tensor
    every_group: torch.Tensor
    """``[context rank, position]``: the positions each context-parallel group holds."""
    segments: list[_Segment]
    slots: int
    successors: list[int | None]
    shortest: int


class SequenceShards:
    """The positions this rank holds: all of them (``mesh=None``, no ``context``), or one
    of ``mesh.size()`` equal, contiguous shards of dim 1 (tensor parallelism) of the
    positions the context-parallel ``context`` gives this rank's group (all, without)."""

    def __init__(self, mesh: DeviceMesh | None = None, context: ContextLayout | None = None):
        self.mesh = mesh
        self.size = mesh.size() if mesh is not None else 1
        self.rank = mesh.get_local_rank() if mesh is not None else 0
        self.context = context

    @property
    def sharded(self) -> bool:
        return self.size > 1 or self.context is not None

    def _routes(self, length: int, device: torch.device) -> _Routes:
        """The layout of a ``length``-position sequence over the context and tensor
        parallel ranks; computed once per length (one all-gather of positions)."""
        context = self.context
        key = (length, self.rank)
        if key not in context._routes:
            mine = context.positions_of(length).to(device=device, dtype=torch.int64)
            every_group = all_gather(mine[None], context.mesh)
            every = every_group.tolist()  # [cp rank][position]
            n = len(every[0]) // self.size
            shards = [ranks[t * n : (t + 1) * n] for ranks in every for t in range(self.size)]
            segments = [_segments(shard) for shard in shards]
            slots = max(len(s) for s in segments)
            heads = {
                seg.start: i * slots + j for i, s in enumerate(segments) for j, seg in enumerate(s)
            }
            me = context.mesh.get_local_rank() * self.size + self.rank
            context._routes[key] = _Routes(
                positions=torch.tensor(shards[me], device=device),
                group_positions=mine,
                every_group=every_group,
                segments=segments[me],
                slots=slots,
                successors=[heads.get(seg.start + seg.length) for seg in segments[me]],
                shortest=min(seg.length for s in segments for seg in s),
            )
        return context._routes[key]

    def _length(self, x: torch.Tensor) -> int:
        """The whole sequence's length, from this rank's shard of it."""
        return x.shape[1] * self.size * (self.context.mesh.size() if self.context else 1)

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a whole-sequence tensor (e.g. labels or a mask)."""
        if self.context is not None:
            return full.index_select(1, self._routes(full.shape[1], full.device).positions)
        if not self.sharded:
            return full
        n = full.shape[1] // self.size
        return full[:, self.rank * n : (self.rank + 1) * n]

    def in_group(self, full: torch.Tensor) -> torch.Tensor:
        """The positions this rank's tensor-parallel group holds together, of a
        whole-sequence tensor: what a vocabulary-split head's logits cover (all of them
        without context parallelism)."""
        if self.context is None:
            return full
        return full.index_select(1, self._routes(full.shape[1], full.device).group_positions)

    def whole(self, in_group: torch.Tensor) -> torch.Tensor:
        """The whole sequence of a tensor context parallelism split (``[batch, positions
        of this rank's group, ...]``, as torchtitan shards inputs and labels), in order, on
        every rank; no gradient (token ids, labels, positions)."""
        if self.context is None:
            return in_group
        length = in_group.shape[1] * self.context.mesh.size()
        routes = self._routes(length, in_group.device)
        parts = all_gather(in_group.detach().transpose(0, 1).contiguous(), self.context.mesh)
        out = in_group.new_empty((in_group.shape[0], length, *in_group.shape[2:]))
        out[:, routes.every_group.flatten()] = parts.transpose(0, 1)
        return out

    def shift_left(
        self, x: torch.Tensor, k: int, fill: float | int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``shift_left`` of the whole sequence, on this rank's shard: the last k positions
        of a shard come from the next rank's first k (gradients flow back to it), those
        of the last shard are ``fill``. Communicates only the k boundary positions."""
        if self.context is not None:
            return self._shift_over_segments(x, k, fill, dtype)
        if not self.sharded:
            return shift_left(x, k, fill, dtype)
        if k > x.shape[1]:
            raise ValueError(
                f"a shift by {k} positions crosses more than one sequence shard of "
                f"{x.shape[1]} positions"
            )
        # Gather every rank's first k positions along dim 0 (the collectives' native
        # layout), then keep the next rank's.
        heads = all_gather(x[:, :k].transpose(0, 1).contiguous(), self.mesh)
        following_rank = (self.rank + 1) % self.size
        following = heads[following_rank * k : (following_rank + 1) * k].transpose(0, 1)
        if following_rank == 0:
            # The last shard has nothing after it. Fill, but from the gathered tensor, so
            # that every rank takes part in the gather's backward (a reduce-scatter).
            everywhere = torch.ones((), dtype=torch.bool, device=x.device)
            following = following.masked_fill(everywhere, fill)
        out = shift_left(x, k, fill, dtype)
        out[:, x.shape[1] - k :] = following
        return out

    def _shift_over_segments(
        self, x: torch.Tensor, k: int, fill: float | int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        """The shift under context parallelism: every rank contributes the first k
        positions of each run of consecutive positions it holds; the last k of each run
        take those of the run that continues it (on this rank or another), or ``fill``."""
        routes = self._routes(self._length(x), x.device)
        if k > routes.shortest:
            raise ValueError(
                f"a shift by {k} positions crosses more than one run of {routes.shortest} "
                "consecutive positions under context parallelism"
            )
        heads = [x[:, seg.at : seg.at + k] for seg in routes.segments]
        heads += [torch.zeros_like(heads[0])] * (routes.slots - len(heads))
        gathered = torch.stack(heads).transpose(1, 2).flatten(0, 1)  # [slot * k, batch, ...]
        if self.size > 1:
            gathered = all_gather(gathered.contiguous(), self.mesh)
        gathered = all_gather(gathered.contiguous(), self.context.mesh)
        gathered = gathered.unflatten(0, (-1, k)).transpose(1, 2)  # [slot, batch, k, ...]
        out = shift_left(x, k, fill, dtype)
        for seg, successor in zip(routes.segments, routes.successors, strict=True):
            if successor is None:
                # The sequence ends here. Fill from the gathered tensor all the same, so
                # that every rank takes part in the gathers' backward.
                everywhere = torch.ones((), dtype=torch.bool, device=x.device)
                following = gathered[0].masked_fill(everywhere, fill)
            else:
                following = gathered[successor]
            out[:, seg.at + seg.length - k : seg.at + seg.length] = following
        return out

    def all_positions(self, x: torch.Tensor) -> torch.Tensor:
        """The positions of this rank's tensor-parallel group (the whole sequence without
        context parallelism) on every rank of it, for a computation that each rank does in
        part (a head split over the vocabulary): in backward the ranks' gradients add up,
        each rank getting its own positions' sum (a reduce-scatter)."""
        if self.size == 1:
            return x
        return all_gather(x.transpose(0, 1).contiguous(), self.mesh).transpose(0, 1)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``all_positions`` without gradient (for measurements, not losses)."""
        return self.all_positions(x.detach())

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over this rank's tensor-parallel group of a per-shard sum, the same on
        every rank of it (context-parallel groups add up like data-parallel ones)."""
        if self.size == 1:
            return partial
        return sum_over_ranks(partial, self.mesh)


UNSHARDED = SequenceShards()
